"""The virtio notify area in mapped memory, polled by the device (``polled_notify``).

With :attr:`~vfio_user_server.virtio.pci.VirtioPciDevice.polled_notify` set, the notify
structure's page of the virtio BAR is a mapped area
(:mod:`vfio_user_server.mapped`): QEMU maps it into the guest, so the driver's queue
notification is a plain store that never leaves the vCPU, and an
:class:`~vfio_user_server.mapped.AreaWatcher` thread polls the queues' notify cells.

A notification is an event, but the driver writes the same value (its queue index) each time,
so each cell holds a sentinel (all-ones, which no 16-bit queue index store can leave) that the
watcher puts back *before* it kicks the queue: a notification stored after the sentinel wakes
the watcher again, and one stored between the watcher's look and the sentinel is covered by the
kick that follows (the queue is read after it, and the driver updates the ring before it
notifies). A device reset writes the sentinels again.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ..mapped import MappedBar, PolledArea

if TYPE_CHECKING:
    from .pci import VirtioPciDevice

__all__ = ["SENTINEL", "NotifyPoller"]

#: What a notify cell holds while no notification is pending.
SENTINEL = 0xFFFFFFFF


class NotifyPoller(PolledArea):
    """The notify cells of one device (4 bytes per queue) and the thread that polls them."""

    def __init__(self, device: VirtioPciDevice, mem: MappedBar, offset: int,
                 multiplier: int) -> None:
        self._device = device
        self.multiplier = multiplier
        length = device.num_queues * multiplier
        self._cells = struct.Struct(f"<{length // 4}I")
        super().__init__(mem, offset, length, name=f"virtio-notify-{type(device).__name__}")
        self.arm()

    def arm(self) -> None:
        """Every cell back to the sentinel (construction, device reset)."""
        self.mem.fill(self.offset, self.length, 0xFF)

    def changed(self, before: bytes, after: bytes) -> bytes:
        """Watcher thread: re-arm the notified cells, then kick their queues."""
        del before
        cells = list(self._cells.unpack(after))
        step = self.multiplier // 4
        kicked = []
        for i in range(0, len(cells), step):
            if cells[i] != SENTINEL:
                self.mem.set_u32(self.offset + 4 * i, SENTINEL)
                cells[i] = SENTINEL
                kicked.append(i // step)
        if kicked:
            device = self._device
            with device.lock:
                for index in kicked:
                    device.kick(index)
        return self._cells.pack(*cells)
