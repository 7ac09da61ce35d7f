"""Capabilities: placement and chain walk, PM, MSI, MSI-X (+ table/PBA), PCIe FLR, vendor caps."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfio_user_server.errors import DeviceDefinitionError, RegionAccessError
from vfio_user_server.pci import (
    COMMAND,
    COMMAND_MASTER,
    COMMAND_MEMORY,
    Bar,
    Capability,
    CapabilityList,
    ConfigSpace,
    DeviceSerialNumber,
    ExtendedCapability,
    Header,
    Msi,
    MsiX,
    MsixTable,
    PciConfig,
    PciExpress,
    PowerManagement,
    VendorSpecific,
    VendorSpecificExtended,
)

HEADER = Header(vendor_id=0x1B36, device_id=0x0002, interrupt_pin=1)


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "little")


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def _linux_walk(raw: bytes) -> list[tuple[int, int]]:
    """Walk the standard chain on raw bytes as Linux's __pci_find_next_cap_ttl does."""
    found: list[tuple[int, int]] = []
    if not int.from_bytes(raw[6:8], "little") & 0x10:
        return found
    pos = raw[0x34]
    ttl = 48
    while ttl and pos >= 0x40:
        pos &= ~3
        cap_id = raw[pos]
        if cap_id == 0xFF:
            break
        found.append((pos, cap_id))
        pos = raw[pos + 1]
        ttl -= 1
    return found


def _linux_walk_ext(raw: bytes) -> list[tuple[int, int, int]]:
    """Walk the extended chain as pci_find_next_ext_capability does."""
    found: list[tuple[int, int, int]] = []
    if len(raw) <= 0x100:
        return found
    pos = 0x100
    ttl = (4096 - 256) // 8
    header = int.from_bytes(raw[pos : pos + 4], "little")
    if header == 0:
        return found
    while ttl > 0:
        found.append((pos, header & 0xFFFF, (header >> 16) & 0xF))
        pos = header >> 20
        if pos < 0x100:
            break
        header = int.from_bytes(raw[pos : pos + 4], "little")
        ttl -= 1
    return found


def _full_config() -> tuple[PciConfig, dict[str, object]]:
    pm = PowerManagement()
    msi = Msi(4, per_vector_mask=True)
    msix = MsiX(8, table_bar=0, table_offset=0x2000, pba_offset=0x3000)
    pcie = PciExpress()
    vendor = VendorSpecific(b"hello")
    dsn = DeviceSerialNumber(0x1122334455667788)
    vsec = VendorSpecificExtended(0x1234, b"\x01\x02\x03\x04", vsec_rev=2)
    config = PciConfig(
        HEADER,
        bars={0: Bar(0x4000, kind="mem64"), 2: Bar(256, kind="io")},
        capabilities=[pm, msi, msix, pcie, vendor],
        extended_capabilities=[dsn, vsec],
    )
    caps: dict[str, object] = {
        "pm": pm,
        "msi": msi,
        "msix": msix,
        "pcie": pcie,
        "vendor": vendor,
        "dsn": dsn,
        "vsec": vsec,
    }
    return config, caps


# -- placement and walking ---------------------------------------------------------------------


def test_chain_walk_like_linux() -> None:
    config, _caps = _full_config()
    assert config.size == 4096  # PCIe capability implies express
    raw = config.read(0, 4096)
    walked = _linux_walk(raw)
    assert [cap_id for _, cap_id in walked] == [0x01, 0x05, 0x11, 0x10, 0x09]
    assert walked == list(config.walk_capabilities())
    offsets = [off for off, _ in walked]
    assert offsets[0] == 0x40
    assert all(off % 4 == 0 and 0x40 <= off < 0x100 for off in offsets)
    for cap, (off, _) in zip(config.capabilities, walked, strict=True):
        assert cap.offset == off
    # no two capabilities overlap
    spans = sorted((c.offset, c.offset + c.length) for c in config.capabilities)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start

    ext = _linux_walk_ext(raw)
    assert ext == [(0x100, 0x0003, 1), (0x10C, 0x000B, 1)]
    assert ext == list(config.walk_extended_capabilities())


def test_find_capability() -> None:
    config, caps = _full_config()
    assert config.find_capability(MsiX) is caps["msix"]
    assert config.find_capability(0x05) is caps["msi"]
    assert config.find_capability(0x12) is None
    assert config.find_extended_capability(DeviceSerialNumber) is caps["dsn"]
    assert config.find_extended_capability(0x000B) is caps["vsec"]
    assert config.find_extended_capability(0x0001) is None


def test_no_capabilities() -> None:
    config = PciConfig(HEADER)
    assert list(config.walk_capabilities()) == []
    assert list(config.walk_extended_capabilities()) == []
    express = PciConfig(HEADER, express=True)
    assert express.size == 4096
    assert express.space.u32(0x100) == 0
    assert list(express.walk_extended_capabilities()) == []


def test_explicit_offsets_and_auto_fill() -> None:
    pm = PowerManagement(offset=0x80)
    msi = Msi(1, address64=False)
    vendor = VendorSpecific(b"x" * 60)
    config = PciConfig(HEADER, capabilities=[pm, msi, vendor])
    assert pm.offset == 0x80
    assert msi.offset == 0x40
    assert vendor.offset == 0x88  # 64 bytes do not fit in 0x4c..0x80
    assert [off for off, _ in config.walk_capabilities()] == [0x80, 0x40, 0x88]


@pytest.mark.parametrize(
    "caps",
    [
        [PowerManagement(offset=0x40), Msi(offset=0x44)],  # overlap
        [PowerManagement(offset=0x42)],  # unaligned
        [PowerManagement(offset=0x30)],  # in the header
        [PowerManagement(offset=0xFC)],  # overflows 0x100
        [VendorSpecific(b"x" * 100), VendorSpecific(b"y" * 100)],  # no room
    ],
)
def test_placement_errors(caps: list[Capability]) -> None:
    with pytest.raises(DeviceDefinitionError):
        PciConfig(HEADER, capabilities=caps)


def test_extended_placement_errors() -> None:
    with pytest.raises(DeviceDefinitionError):  # needs 4 KiB: express is implied, so use raw
        CapabilityList(extended=[DeviceSerialNumber(1)]).install(ConfigSpace(256))
    with pytest.raises(DeviceDefinitionError):
        PciConfig(HEADER, extended_capabilities=[DeviceSerialNumber(1, offset=0x200)])
    with pytest.raises(DeviceDefinitionError):
        PciConfig(
            HEADER,
            extended_capabilities=[
                DeviceSerialNumber(1, offset=0x100),
                DeviceSerialNumber(2, offset=0x108),
            ],
        )
    with pytest.raises(DeviceDefinitionError):
        PciConfig(HEADER, extended_capabilities=[DeviceSerialNumber(1, offset=0xFFC)])


def test_capability_used_twice() -> None:
    pm = PowerManagement()
    PciConfig(HEADER, capabilities=[pm])
    with pytest.raises(DeviceDefinitionError):
        PciConfig(HEADER, capabilities=[pm])


def test_unplaced_capability_access() -> None:
    with pytest.raises(DeviceDefinitionError):
        _ = PowerManagement().power_state


@given(
    offset=st.integers(0x40, 0xFF),
    size=st.sampled_from([1, 2, 4]),
    value=st.binary(min_size=4, max_size=4),
)
def test_capability_headers_are_read_only(offset: int, size: int, value: bytes) -> None:
    config, _ = _full_config()
    offset = min(offset, 0x100 - size)
    config.write(offset, value[:size])
    assert _linux_walk(config.read(0, 256)) == list(config.walk_capabilities())
    assert len(list(config.walk_capabilities())) == 5


# -- Power Management ---------------------------------------------------------------------------


def test_power_management() -> None:
    changes: list[tuple[int, int]] = []
    pm = PowerManagement(on_state_change=lambda old, new: changes.append((old, new)))
    config = PciConfig(HEADER, capabilities=[pm])
    base = pm.offset
    assert config.space.u8(base) == 0x01
    assert config.space.u16(base + 2) & 0x7 == 0x3  # version 1.2
    assert config.space.u16(base + 4) == 0x0008  # D0, No_Soft_Reset
    config.write(base + 4, _u16(0x0003))
    assert pm.power_state == PowerManagement.D3HOT
    config.write(base + 4, _u16(0x0001))  # D1 not supported: ignored
    assert pm.power_state == PowerManagement.D3HOT
    config.write(base + 4, _u16(0xFFF0))  # state bits 0: D0; other bits RO
    assert config.space.u16(base + 4) == 0x0008
    config.write(base + 5, b"\xff")  # high byte only
    assert config.space.u16(base + 4) == 0x0008
    assert changes == [(0, 3), (3, 0)]
    config.write(base + 4, _u16(0x0003))
    config.reset()
    assert pm.power_state == PowerManagement.D0


def test_power_management_without_no_soft_reset() -> None:
    pm = PowerManagement(no_soft_reset=False)
    config = PciConfig(HEADER, capabilities=[pm])
    assert config.space.u16(pm.offset + 4) == 0


# -- MSI ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address64", "mask", "length"),
    [(False, False, 10), (True, False, 14), (False, True, 20), (True, True, 24)],
)
def test_msi_layouts(address64: bool, mask: bool, length: int) -> None:
    msi = Msi(8, address64=address64, per_vector_mask=mask)
    config = PciConfig(HEADER, capabilities=[msi])
    assert msi.length == length
    control = config.space.u16(msi.offset + 2)
    assert control & 0x0E == 3 << 1  # 8 vectors capable
    assert bool(control & 0x80) == address64
    assert bool(control & 0x100) == mask
    data_off = msi.offset + (0x0C if address64 else 0x08)
    config.write(msi.offset + 4, _u32(0xFEE0_1003))
    assert config.space.u32(msi.offset + 4) == 0xFEE0_1000  # bits 1:0 RO 0
    if address64:
        config.write(msi.offset + 8, _u32(0x1))
    config.write(data_off, _u32(0xFFFF_4021))
    assert config.space.u32(data_off) == 0x4021  # extended data bits reserved
    assert msi.address == (0x1_FEE0_1000 if address64 else 0xFEE0_1000)
    assert msi.data == 0x4021


def test_msi_enable_vectors_and_callback() -> None:
    events: list[tuple[bool, int]] = []
    msi = Msi(4, per_vector_mask=True)
    msi.on_change = lambda: events.append((msi.enabled, msi.num_enabled_vectors))
    config = PciConfig(HEADER, capabilities=[msi])
    ctl = msi.offset + 2
    assert not msi.enabled
    assert msi.num_enabled_vectors == 1
    config.write(ctl, _u16(0x0021))  # enable, MME = 2 (4 vectors)
    assert msi.enabled and msi.num_enabled_vectors == 4
    config.write(ctl, _u16(0x0051))  # MME = 5 > MMC = 2: clamped
    assert msi.num_enabled_vectors == 4
    assert config.space.u16(ctl) & 0x70 == 0x20
    config.write(ctl, _u16(0xFFFF))  # RO bits keep their value
    assert config.space.u16(ctl) == 0x0100 | 0x0080 | (2 << 1) | 0x20 | 1
    config.write(ctl, _u16(0))
    assert events == [(True, 4), (False, 1)]

    config.write(msi.offset + 0x0C, _u16(0x1234))
    config.write(ctl, _u16(0x0021))
    assert msi.message(3) == (0, 0x1237)
    with pytest.raises(IndexError):
        msi.message(4)


def test_msi_mask_and_pending() -> None:
    events: list[int] = []
    msi = Msi(4, per_vector_mask=True, on_change=lambda: events.append(1))
    config = PciConfig(HEADER, capabilities=[msi])
    mask_off, pend_off = msi.offset + 0x10, msi.offset + 0x14
    config.write(mask_off, _u32(0xFFFF_FFFF))
    assert config.space.u32(mask_off) == 0xF  # only implemented vectors
    assert all(msi.is_masked(v) for v in range(4))
    assert events == [1]
    config.write(mask_off, _u32(0xFFFF_FFFF))  # no change: no callback
    assert events == [1]
    config.write(mask_off, b"\x0d")  # unmask vector 1
    assert not msi.is_masked(1) and msi.is_masked(0)
    assert events == [1, 1]
    msi.set_pending(2, True)
    assert msi.is_pending(2)
    assert config.space.u32(pend_off) == 0x4
    config.write(pend_off, _u32(0))  # pending bits RO
    assert config.space.u32(pend_off) == 0x4
    msi.set_pending(2, False)
    assert config.space.u32(pend_off) == 0


def test_msi_without_masking() -> None:
    msi = Msi(1, address64=False)
    PciConfig(HEADER, capabilities=[msi])
    assert not msi.is_masked(0)
    msi.set_pending(0, True)
    assert not msi.is_pending(0)


@pytest.mark.parametrize("vectors", [0, 3, 64])
def test_msi_bad_vectors(vectors: int) -> None:
    with pytest.raises(DeviceDefinitionError):
        Msi(vectors)


def test_msi_reset_reports_disable() -> None:
    events: list[bool] = []
    msi = Msi(1)
    msi.on_change = lambda: events.append(msi.enabled)
    config = PciConfig(HEADER, capabilities=[msi])
    config.write(msi.offset + 2, _u16(1))
    config.reset()
    assert events == [True, False]


# -- MSI-X ----------------------------------------------------------------------------------------


def _msix(vectors: int = 8) -> tuple[PciConfig, MsiX]:
    msix = MsiX(vectors, table_bar=0, table_offset=0x2000, pba_offset=0x3000)
    config = PciConfig(HEADER, bars={0: Bar(0x4000)}, capabilities=[msix])
    return config, msix


def test_msix_registers() -> None:
    config, msix = _msix()
    base = msix.offset
    assert config.space.u8(base) == 0x11
    assert config.space.u16(base + 2) == 7
    assert config.space.u32(base + 4) == 0x2000
    assert config.space.u32(base + 8) == 0x3000
    config.write(base + 2, _u16(0xFFFF))
    assert config.space.u16(base + 2) == 0xC007
    assert msix.enabled and msix.function_masked
    config.write(base + 4, _u32(0))
    config.write(base + 8, _u32(0))
    assert config.space.u32(base + 4) == 0x2000
    assert config.space.u32(base + 8) == 0x3000


def test_msix_table_bir_and_pba_elsewhere() -> None:
    msix = MsiX(16, table_bar=2, table_offset=0, pba_bar=4, pba_offset=0x800)
    config = PciConfig(
        HEADER, bars={2: Bar(0x1000, kind="mem64"), 4: Bar(0x1000)}, capabilities=[msix]
    )
    assert config.space.u32(msix.offset + 4) == 0x2
    assert config.space.u32(msix.offset + 8) == 0x804
    table = msix.table
    assert table.owns(2, 0, 16)
    assert not table.owns(4, 0, 16)
    assert table.owns(4, 0x800, 8)
    msix.set_pending(15, True)
    assert table.read(0x800, 8, bar=4) == (1 << 15).to_bytes(8, "little")
    with pytest.raises(RegionAccessError):
        table.read(0x800, 8)  # BAR 2 has no PBA at 0x800


def test_msix_default_pba_follows_table() -> None:
    msix = MsiX(4, table_bar=0)
    PciConfig(HEADER, bars={0: Bar(4096)}, capabilities=[msix])
    assert msix.table.pba_offset == 64


@pytest.mark.parametrize(
    ("bars", "kwargs"),
    [
        ({}, {"table_bar": 0}),  # no BAR
        ({0: Bar(16, kind="io")}, {"table_bar": 0}),  # IO BAR
        ({0: Bar(64)}, {"table_bar": 0}),  # table + PBA do not fit
        ({0: Bar(0x1000)}, {"table_bar": 0, "table_offset": 0xFC0}),
        ({0: Bar(0x1000)}, {"table_bar": 0, "pba_offset": 0x20}),  # PBA overlaps table
        ({0: Bar(0x1000)}, {"table_bar": 0, "table_offset": 4}),  # misaligned
        ({0: Bar(0x1000)}, {"table_bar": 6}),
        ({0: Bar(0x1000, kind="mem64")}, {"table_bar": 1}),  # upper half of a 64-bit BAR
    ],
)
def test_msix_definition_errors(bars: dict[int, Bar], kwargs: dict[str, Any]) -> None:
    with pytest.raises(DeviceDefinitionError):
        PciConfig(HEADER, bars=bars, capabilities=[MsiX(4, **kwargs)])


def test_msix_vectors_range() -> None:
    with pytest.raises(DeviceDefinitionError):
        MsiX(0, table_bar=0)
    with pytest.raises(DeviceDefinitionError):
        MsiX(2049, table_bar=0)


def test_msix_table_memory() -> None:
    _config, msix = _msix()
    table = msix.table
    # initial state: everything zero, every vector masked
    for v in range(8):
        assert table.read(0x2000 + 16 * v, 16) == b"\x00" * 12 + b"\x01\x00\x00\x00"
        assert msix.is_masked(v)
    entry = 0x2000 + 16 * 3
    table.write(entry, _u32(0xFEE0_0003))
    table.write(entry + 4, _u32(0x1))
    table.write(entry + 8, _u32(0xDEAD_BEEF))
    table.write(entry + 12, _u32(0xFFFF_FFFE))  # unmask; reserved bits RO 0
    assert table.entry(3) == (0x1_FEE0_0000, 0xDEAD_BEEF, 0)
    assert table.read(entry + 12, 4) == b"\x00" * 4
    assert not table.is_vector_masked(3)
    # 8-byte access, and 1-byte access at odd offsets
    table.write(entry, (0x2_FEE0_1000).to_bytes(8, "little"))
    assert table.read(entry, 8) == (0x2_FEE0_1000).to_bytes(8, "little")
    table.write(entry + 9, b"\x00")
    assert table.entry(3)[1] == 0xDEAD_00EF
    # a write spanning two entries
    table.write(entry + 12, b"\x01\x00\x00\x00\x55\x55\x55\x55")
    assert table.is_vector_masked(3)
    assert table.entry(4)[0] == 0x5555_5554
    with pytest.raises(RegionAccessError):
        table.read(0x1FFC, 8)
    with pytest.raises(RegionAccessError):
        table.write(0x2000 + 16 * 8, b"\x00")


def test_msix_masking_and_callbacks() -> None:
    mask_events: list[tuple[int, bool]] = []
    control_events: list[tuple[bool, bool]] = []
    config, msix = _msix(4)
    msix.table.on_mask_change = lambda v, m: mask_events.append((v, m))
    msix.on_change = lambda: control_events.append((msix.enabled, msix.function_masked))
    ctl = msix.offset + 2
    entry1 = 0x2000 + 16

    config.write(ctl, _u16(0xC000))  # enable + function mask
    assert control_events == [(True, True)]
    msix.table.write(entry1 + 12, _u32(0))  # vector unmasked, function still masked
    assert msix.is_masked(1)
    assert mask_events == []
    config.write(ctl, _u16(0x8000))  # function unmask: vector 1 becomes deliverable
    assert control_events == [(True, True), (True, False)]
    assert mask_events == [(1, False)]
    assert not msix.is_masked(1)
    msix.table.write(entry1 + 12, _u32(1))
    assert mask_events == [(1, False), (1, True)]
    msix.table.write(entry1 + 12, _u32(1))  # no change
    assert len(mask_events) == 2
    msix.table.write(entry1 + 12, b"\x00")
    assert mask_events[-1] == (1, False)
    config.write(ctl, _u16(0x8000))  # same control value: no callback
    assert len(control_events) == 2


def test_msix_pba() -> None:
    config, msix = _msix(70)  # needs two qwords of PBA
    config_bar = config.bars[0]
    assert config_bar is not None
    table = msix.table
    assert table.pba_size == 16
    table.set_pending(0, True)
    table.set_pending(65, True)
    assert table.read(0x3000, 16) == (1 | 1 << 65).to_bytes(16, "little")
    assert table.read(0x3008, 1) == b"\x02"
    assert table.read(0x3000, 4) == _u32(1)
    table.write(0x3000, b"\x00" * 8)  # PBA is read-only, write dropped
    assert table.is_pending(0)
    assert table.pending_vectors() == [0, 65]
    msix.set_pending(0, False)
    assert table.pending_vectors() == [65]
    with pytest.raises(IndexError):
        table.set_pending(70, True)


def test_msix_reset() -> None:
    config, msix = _msix(2)
    config.write(msix.offset + 2, _u16(0x8000))
    msix.table.write(0x2000, _u32(0xFEE0_0000))
    msix.table.write(0x200C, _u32(0))
    msix.set_pending(1, True)
    config.reset()
    assert not msix.enabled
    assert msix.table.entry(0) == (0, 0, 1)
    assert msix.table.pending_vectors() == []


def test_msix_table_standalone() -> None:
    table = MsixTable(2, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x100)
    assert table.read(0, 32)[12] == 1
    table.set_control(True, False)
    table.write(12, _u32(0))
    assert not table.is_masked(0)
    table.set_control(True, True)
    assert table.is_masked(0)


# -- PCI Express ----------------------------------------------------------------------------------


def test_pcie_registers() -> None:
    pcie = PciExpress()
    config = PciConfig(HEADER, capabilities=[pcie])
    base = pcie.offset
    assert config.size == 4096
    assert pcie.length == 0x3C
    caps = config.space.u16(base + 2)
    assert caps & 0xF == 2  # version 2
    assert (caps >> 4) & 0xF == 0  # endpoint
    assert config.space.u32(base + 4) & (1 << 28)  # FLR capable
    link_caps = config.space.u32(base + 0x0C)
    assert link_caps & 0xF == 1 and (link_caps >> 4) & 0x3F == 1  # 2.5 GT/s x1
    link_sta = config.space.u16(base + 0x12)
    assert link_sta & 0xF == 1 and (link_sta >> 4) & 0x3F == 1
    assert config.space.u32(base + 0x2C) == 0x2  # supported speeds: 2.5 GT/s
    config.write(base + 0x12, _u16(0))  # link status RO
    assert config.space.u16(base + 0x12) == link_sta
    config.write(base + 0x28, _u16(0xFFFF))  # device control 2: completion timeout disable
    assert config.space.u16(base + 0x28) == 0x0010
    assert config.space.u16(0x0D) == 0  # latency timer hardwired on PCIe
    config.write(0x0D, b"\xff")
    assert config.space.u8(0x0D) == 0


def test_pcie_flr() -> None:
    calls: list[int] = []
    pcie = PciExpress(on_flr=lambda: calls.append(1))
    config = PciConfig(HEADER, capabilities=[pcie])
    ctl = pcie.offset + 8
    before = config.space.u16(ctl)
    config.write(ctl, _u16(before | 0x8000))
    assert calls == [1]
    assert config.space.u16(ctl) & 0x8000 == 0
    config.write(ctl + 1, b"\x80")  # byte write of the high half
    assert calls == [1, 1]
    config.write(ctl, _u32(before))  # 4-byte write without FLR: no callback
    assert calls == [1, 1]


def test_pcie_flr_resets_config() -> None:
    pcie = PciExpress()
    msi = Msi(1)
    config = PciConfig(HEADER, capabilities=[msi, pcie])
    pcie.on_flr = config.reset
    config.write(COMMAND, _u16(COMMAND_MEMORY | COMMAND_MASTER))
    config.write(msi.offset + 2, _u16(1))
    config.write(pcie.offset + 8, _u16(0x8000))
    assert config.command == 0
    assert not msi.enabled
    assert config.space.u16(pcie.offset + 8) == 0x2810


def test_pcie_without_flr() -> None:
    calls: list[int] = []
    pcie = PciExpress(flr=False, on_flr=lambda: calls.append(1))
    config = PciConfig(HEADER, capabilities=[pcie])
    assert not config.space.u32(pcie.offset + 4) & (1 << 28)
    config.write(pcie.offset + 8, _u16(0x8000))
    assert calls == []


def test_pcie_device_status_rw1c() -> None:
    pcie = PciExpress()
    config = PciConfig(HEADER, capabilities=[pcie])
    sta = pcie.offset + 0x0A
    config.space.set_u16(sta, 0x003F)
    config.write(sta, _u16(0x0005))
    assert config.space.u16(sta) == 0x003A
    config.write(sta, _u16(0xFFFF))
    assert config.space.u16(sta) == 0x0030


@pytest.mark.parametrize(
    "kwargs",
    [{"port_type": 4}, {"max_payload": 100}, {"link_speed": 0}, {"link_width": 3}],
)
def test_pcie_definition_errors(kwargs: dict[str, int]) -> None:
    with pytest.raises(DeviceDefinitionError):
        PciExpress(**kwargs)  # type: ignore[arg-type]


# -- vendor-specific and extended -----------------------------------------------------------------


def test_vendor_specific() -> None:
    vendor = VendorSpecific(b"hello")
    config = PciConfig(HEADER, capabilities=[vendor])
    base = vendor.offset
    assert config.read(base, 8) == bytes([0x09, 0x00, 8]) + b"hello"
    config.write(base, b"\x00" * 8)
    assert config.read(base + 2, 6) == bytes([8]) + b"hello"
    with pytest.raises(DeviceDefinitionError):
        VendorSpecific(b"x" * 200)


def test_extended_capabilities() -> None:
    config, caps = _full_config()
    assert config.read(0x100, 12) == (
        _u32(0x0003 | 1 << 16 | 0x10C << 20) + _u32(0x55667788) + _u32(0x11223344)
    )
    vsec = caps["vsec"]
    assert isinstance(vsec, VendorSpecificExtended)
    assert vsec.offset == 0x10C
    assert config.space.u32(0x10C) == 0x000B | 1 << 16  # last: next = 0
    assert config.space.u32(0x110) == 0x1234 | 2 << 16 | 12 << 20
    assert config.read(0x114, 4) == b"\x01\x02\x03\x04"
    config.write(0x100, b"\x00" * 32)  # all read-only
    assert list(config.walk_extended_capabilities()) == [(0x100, 3, 1), (0x10C, 0xB, 1)]


def test_extended_definition_errors() -> None:
    with pytest.raises(DeviceDefinitionError):
        DeviceSerialNumber(1 << 64)
    with pytest.raises(DeviceDefinitionError):
        VendorSpecificExtended(0x10000, b"")
    with pytest.raises(DeviceDefinitionError):
        VendorSpecificExtended(1, b"x" * 4096)


def test_custom_capability_from_a_table() -> None:
    from vfio_user_server.pci import Field

    class Scratch(Capability):
        """A made-up capability: one RW dword, one RW1C byte."""

        cap_id = 0x0A
        FIELDS = (
            *Capability.HEADER,
            Field("flags", 0x02, 1, 0, 0xFF),
            Field("scratch", 0x04, 4, 0xFFFFFFFF),
        )

    class Ext(ExtendedCapability):
        cap_id = 0x0042
        version = 3
        FIELDS = (*ExtendedCapability.HEADER, Field("value", 0x04, 4, 0xFFFF0000))

    scratch, ext = Scratch(), Ext()
    config = PciConfig(HEADER, capabilities=[scratch], extended_capabilities=[ext])
    scratch.set("flags", 0x0F)
    config.write(scratch.offset, _u32(0x0003FFFF))
    assert scratch.get("flags") == 0x0C
    config.write(scratch.offset + 4, _u32(0x12345678))
    assert scratch.get("scratch") == 0x12345678
    config.write(ext.offset + 4, _u32(0xFFFFFFFF))
    assert ext.get("value") == 0xFFFF0000
    assert list(config.walk_extended_capabilities()) == [(0x100, 0x42, 3)]


def test_msix_reset_reports_changes() -> None:
    mask_events: list[tuple[int, bool]] = []
    control_events: list[bool] = []
    config, msix = _msix(2)
    msix.table.on_mask_change = lambda v, m: mask_events.append((v, m))
    msix.on_change = lambda: control_events.append(msix.enabled)
    config.write(msix.offset + 2, _u16(0x8000))
    msix.table.write(0x200C, _u32(0))
    assert mask_events == [(0, False)]
    config.reset()
    assert mask_events == [(0, False), (0, True)]
    assert control_events == [True, False]


@given(
    writes=st.lists(
        st.tuples(
            st.integers(0, 16 * 4 - 1),
            st.sampled_from([1, 2, 4, 8]),
            st.binary(min_size=8, max_size=8),
        ),
        max_size=30,
    )
)
def test_msix_table_random_writes_keep_reserved_bits(
    writes: list[tuple[int, int, bytes]],
) -> None:
    table = MsixTable(4, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x40)
    for offset, size, payload in writes:
        offset = min(offset, 64 - size)
        table.write(offset, payload[:size])
    for vector in range(4):
        address, _data, control = table.entry(vector)
        assert address & 0x3 == 0
        assert control & ~1 == 0
    assert table.read(0x40, 8) == b"\x00" * 8
