"""Mapped BAR areas: device registers in shared memory that the guest touches without a message.

A device declares areas of a memory BAR as mapped (``Bar(size, mapped=((offset, size), ...))``).
The framework then backs that BAR with a memfd of the BAR's size, mapped here
(:class:`MappedBar`), and announces it in the BAR's REGION_INFO reply: the MMAP flag, the
sparse-mmap capability listing the areas (``VFIO_REGION_INFO_CAP_SPARSE_MMAP``; its layout is
in :mod:`vfio_user_server.protocol.structs`) and the memfd sent with the reply. QEMU mmaps each
area into the guest's physical address space, so guest loads and stores there never leave the
vCPU; the rest of the BAR stays trapped (REGION_READ / REGION_WRITE to the device's
``bar_read`` / ``bar_write``). A trapped access that falls in a mapped area (QEMU traps it while
its mmaps are disabled, e.g. around an INTx in userspace INTx mode; a test client always does)
reads or writes the same memory, so both paths see one register.

The device reads and writes the areas as a memoryview (:meth:`PciDevice.mapped
<vfio_user_server.device.PciDevice.mapped>`, :attr:`MappedBar.view`) and, since no message
announces a guest store, polls what it must react to: :class:`AreaWatcher` runs a thread that
waits for a change (:mod:`vfio_user_server.mempoll`, the C shim without the GIL) and calls the
device back, which is how the NVMe doorbells and the virtio notify area work when mapped.

**Posted writes.** QEMU's client (``hw/vfio-user/device.c``, ``vfio_user_get_region_info``)
turns posted writes off for the *whole device* as soon as any REGION_INFO reply carries the
MMAP flag: a store to a mapped area could otherwise overtake an earlier posted write still in
the socket. Every trapped write of such a device is then a synchronous round trip (the vCPU
waits for the reply), so mapping pays only when the mapped registers are the hot ones
(BENCHMARKS.md, "Sparse-mmap registers", measures both ways).

The memory outlives clients: its contents are the device's, kept across connections and
DEVICE_RESET unless the device's ``reset`` clears them. A live upgrade does not carry mapped
memory to the new process (the client keeps the old memfd mapped): a device with mapped areas
cannot be upgraded live.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .endpoint import MmapSpec, Region
from .errors import DeviceDefinitionError
from .mempoll import MemoryWaiter, WaitResult, default_waiter
from .threads import device_thread

if TYPE_CHECKING:
    from .pci import Bar, MsiX

__all__ = ["AreaWatcher", "MappedBar", "MappedBars", "PolledArea", "map_bar"]

log = logging.getLogger(__name__)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class MappedBar:
    """The shared memory of one BAR with mapped areas: a memfd of the BAR's size, mmapped.

    Only the areas are shared with the client; the rest of the file is never touched.
    """

    def __init__(self, index: int, size: int, areas: Sequence[tuple[int, int]]) -> None:
        self.index = index
        self.size = size
        self.areas = tuple(areas)
        self.fd = os.memfd_create(f"pyvfio-bar{index}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            # The client gets this fd (REGION_INFO): sealed, it can neither shrink the file
            # under our mapping (the next access would be SIGBUS in the server) nor add seals.
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self._mem = mmap.mmap(self.fd, size)
        except OSError:
            os.close(self.fd)
            raise
        #: The whole BAR as bytes (only the areas mean anything).
        self.view = memoryview(self._mem)

    def pieces(self, offset: int, count: int) -> list[tuple[int, int, bool]]:
        """Split ``[offset, offset + count)`` into (offset, count, mapped) runs."""
        out: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + count
        for a_off, a_size in sorted(self.areas):
            a_end = a_off + a_size
            if a_end <= pos or a_off >= end:
                continue
            if a_off > pos:
                out.append((pos, a_off - pos, False))
                pos = a_off
            stop = min(end, a_end)
            out.append((pos, stop - pos, True))
            pos = stop
        if pos < end:
            out.append((pos, end - pos, False))
        return out

    def contains(self, offset: int, count: int) -> bool:
        """Is the whole access inside one mapped area?"""
        return any(a <= offset and offset + count <= a + s for a, s in self.areas)

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.view[offset:offset + count])

    def write(self, offset: int, data: bytes) -> None:
        self.view[offset:offset + len(data)] = data

    def u32(self, offset: int) -> int:
        value: int = _U32.unpack_from(self.view, offset)[0]
        return value

    def set_u32(self, offset: int, value: int) -> None:
        _U32.pack_into(self.view, offset, value & 0xFFFFFFFF)

    def u64(self, offset: int) -> int:
        value: int = _U64.unpack_from(self.view, offset)[0]
        return value

    def set_u64(self, offset: int, value: int) -> None:
        _U64.pack_into(self.view, offset, value & 0xFFFFFFFFFFFFFFFF)

    def fill(self, offset: int, count: int, byte: int = 0) -> None:
        self.view[offset:offset + count] = bytes([byte]) * count

    def close(self) -> None:
        """Release the memory (the device is going away; the client may keep its own map).
        Devices are often freed by the cycle collector, at no set time: close explicitly."""
        if self._mem.closed:
            return
        self.view.release()
        self._mem.close()
        os.close(self.fd)


class MappedBars(dict[int, MappedBar]):
    """A device's mapped BARs by index; a BAR without mapped areas is a definition error."""

    def __missing__(self, bar: int) -> MappedBar:
        raise DeviceDefinitionError(f"BAR {bar} has no mapped areas")


def map_bar(index: int, bar: Bar, region: Region, msix: MsiX | None) -> MappedBar:
    """Back BAR ``index``'s mapped areas with memory: announce it in ``region`` (MMAP, the
    areas, the memfd) and put the memory in front of the region's trapped handlers, so a
    trapped access into an area reads or writes the same bytes (one across an area's edge is
    split). Areas over the MSI-X table or PBA are refused."""
    t = msix.table if msix is not None else None
    for offset, size in bar.mapped:
        if t is not None and any(
                b == index and o < offset + size and offset < o + n
                for b, o, n in ((t.table_bar, t.table_offset, t.table_size),
                                (t.pba_bar, t.pba_offset, t.pba_size))):
            raise DeviceDefinitionError(
                f"BAR {index}: mapped area {offset:#x}+{size:#x} overlaps MSI-X")
    mem = MappedBar(index, bar.size, bar.mapped)
    trapped_read, trapped_write = region.read, region.write
    assert trapped_read is not None and trapped_write is not None

    def read(offset: int, count: int) -> bytes:
        return b"".join(mem.read(pos, n) if shared else trapped_read(pos, n)
                        for pos, n, shared in mem.pieces(offset, count))

    def write(offset: int, data: bytes) -> None:
        for pos, n, shared in mem.pieces(offset, len(data)):
            piece = data[pos - offset:pos - offset + n]
            if shared:
                mem.write(pos, piece)
            else:
                trapped_write(pos, piece)

    region.read, region.write = read, write
    region.read_value = region.write_value = None  # the trapped ones: not for the areas
    region.mmap = MmapSpec(mem.fd, 0, areas=list(bar.mapped))
    return mem


class AreaWatcher:
    """A thread that waits for ``[offset, offset + length)`` of a mapped BAR to change and
    calls ``on_change(before, after)`` with the bytes it last saw and the bytes now.

    ``on_change`` runs on the watcher's thread (a device thread: it may take the device's
    lock, do DMA and raise interrupts). What it returns is what the watcher waits to change
    next: None means ``after``; a callback that writes the area itself (a sentinel in a
    notify cell, before it looks at the queue) returns the bytes it wrote. A store by the
    device elsewhere in the area only costs one more call. Started and stopped by the
    device (typically in ``on_connect`` / ``on_disconnect``).
    """

    def __init__(self, bar: MappedBar, offset: int, length: int,
                 on_change: Callable[[bytes, bytes], bytes | None], *, name: str,
                 waiter: MemoryWaiter | None = None) -> None:
        if not bar.contains(offset, length):
            raise ValueError(f"watched range {offset:#x}+{length:#x} is not in one mapped area")
        self.bar = bar
        self.offset = offset
        self.length = length
        self.on_change = on_change
        self.name = name
        self.waiter = waiter if waiter is not None else default_waiter()
        self._thread: threading.Thread | None = None
        #: number of changes handled (tests and benchmarks)
        self.changes = 0

    def _snapshot(self) -> bytes:
        return bytes(self.bar.view[self.offset:self.offset + self.length])

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self.waiter.restart()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        log.debug("%s: polling %#x+%#x of BAR%d (%s)", self.name, self.offset, self.length,
                  self.bar.index, self.waiter.name)

    def stop(self, timeout: float = 5.0) -> None:
        self.waiter.stop()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @device_thread
    def _run(self) -> None:
        view, offset = self.bar.view, self.offset
        last = self._snapshot()
        while True:
            result = self.waiter.wait_change(view, offset, last, 1.0)
            if result is WaitResult.STOPPED:
                return
            if result is WaitResult.TIMEOUT:
                continue
            now = self._snapshot()
            seen: bytes | None = None
            try:
                seen = self.on_change(last, now)
            except Exception:
                log.exception("%s: change handler failed", self.name)
            self.changes += 1
            last = now if seen is None else seen


class PolledArea:
    """A device's polled area: the mapped BAR's memory, one :class:`AreaWatcher` over
    ``[offset, offset + length)`` of it, and their lifetime. A device part subclasses it and
    implements :meth:`changed` (the watcher's ``on_change``); the device starts and stops the
    polling with its client (``on_connect`` / ``on_disconnect``) and closes it with itself.
    The NVMe polled doorbells and the virtio notify area are two.
    """

    def __init__(self, mem: MappedBar, offset: int, length: int, *, name: str) -> None:
        self.mem = mem
        self.offset = offset
        self.length = length
        self.watcher = AreaWatcher(mem, offset, length, self.changed, name=name)

    def changed(self, before: bytes, after: bytes) -> bytes | None:
        """The watcher saw ``after`` where it last saw ``before`` (the watcher's thread)."""
        raise NotImplementedError

    def start(self) -> None:
        self.watcher.start()

    def stop(self) -> None:
        self.watcher.stop()

    def close(self) -> None:
        """Stop polling and release the memory (the device is closed)."""
        self.watcher.stop()
        self.mem.close()
