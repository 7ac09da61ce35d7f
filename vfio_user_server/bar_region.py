"""A PciDevice's BAR as a :class:`~vfio_user_server.endpoint.Region`: the author's
``bar_read`` / ``bar_write`` under the device's lock, the MSI-X table and PBA where they are in
the BAR, and accesses of other sizes split into naturally aligned pieces.

Every trapped BAR access of every device goes through here, so it does no more per access
than it must: what does not change (whether the BAR holds the MSI-X table or PBA) is settled
when the region is built, and the value handlers give the C shim's loop the integer it sends
(:attr:`Region.read_value`, :attr:`Region.write_value`) with no bytes on the way. They are the
rule: the bytes handlers use them for 1, 2, 4 and 8 bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .endpoint import Region

if TYPE_CHECKING:
    from .device import PciDevice

__all__ = ["bar_region", "split"]

#: The access sizes bar_read and bar_write see, and the mask of each.
MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: (1 << 64) - 1}


def bar_region(dev: PciDevice, bar: int, size: int, table_written: Callable[[], None]
               ) -> Region:
    """BAR ``bar`` of ``dev`` (``size`` bytes); ``table_written`` is called when a client
    writes the MSI-X table through it."""
    msix = dev.msix
    table = msix.table if msix is not None and bar in (
        msix.table.table_bar, msix.table.pba_bar) else None

    def table_write(offset: int, data: bytes) -> None:
        assert table is not None
        if table.table_bar == bar and offset < table.table_offset + table.table_size:
            table_written()
        table.write(offset, data, bar)

    # acquire/release rather than ``with``: half the cost of the RLock on every access
    def read_value(offset: int, size: int) -> int:
        lock = dev.lock
        lock.acquire()
        try:
            if table is not None and table.owns(bar, offset, size):
                return int.from_bytes(table.read(offset, size, bar), "little")
            return dev.bar_read(bar, offset, size) & MASKS[size]
        finally:
            lock.release()

    def write_value(offset: int, size: int, value: int) -> None:
        lock = dev.lock
        lock.acquire()
        try:
            if table is not None and table.owns(bar, offset, size):
                table_write(offset, value.to_bytes(size, "little"))
            else:
                dev.bar_write(bar, offset, size, value)
        finally:
            lock.release()

    def read(offset: int, count: int) -> bytes:
        if count in MASKS:
            return read_value(offset, count).to_bytes(count, "little")
        with dev.lock:
            if table is not None and table.owns(bar, offset, count):
                return table.read(offset, count, bar)
            out = bytearray()
            for pos, n in split(offset, count):
                out += (dev.bar_read(bar, pos, n) & MASKS[n]).to_bytes(n, "little")
            return bytes(out)

    def write(offset: int, data: bytes) -> None:
        count = len(data)
        if count in MASKS:
            write_value(offset, count, int.from_bytes(data, "little"))
            return
        with dev.lock:
            if table is not None and table.owns(bar, offset, count):
                table_write(offset, data)
                return
            for pos, n in split(offset, count):
                chunk = data[pos - offset:pos - offset + n]
                dev.bar_write(bar, pos, n, int.from_bytes(chunk, "little"))

    return Region(size, read=read, write=write, read_value=read_value,
                  write_value=write_value)


def split(offset: int, count: int) -> list[tuple[int, int]]:
    """Split an access into naturally aligned 4/2/1-byte pieces."""
    pieces = []
    end = offset + count
    pos = offset
    while pos < end:
        for size in (4, 2, 1):
            if pos % size == 0 and pos + size <= end:
                pieces.append((pos, size))
                pos += size
                break
    return pieces
