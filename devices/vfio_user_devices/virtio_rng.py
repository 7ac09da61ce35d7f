"""virtio-rng: an entropy device (virtio device ID 4) fed by the host's ``os.urandom``.

Served as ``vfio-user-server --socket S virtio-rng [--packed]``; Linux binds ``virtio_pci`` then
``virtio_rng``, which registers with the hw_random core (``/dev/hwrng``). One queue
(requestq): each request is a chain of device-writable buffers, filled with random bytes (at
most :data:`MAX_REQUEST` per request, as the specification allows the device to return fewer).
"""

from __future__ import annotations

import os

from vfio_user_server.options import Option
from vfio_user_server.virtio import DeviceId, VirtioPciDevice, Virtqueue

__all__ = ["MAX_REQUEST", "VirtioRng"]

#: Bytes of entropy given per request at most.
MAX_REQUEST = 64 << 10


class VirtioRng(VirtioPciDevice):
    """The entropy device."""

    virtio_device_id = DeviceId.ENTROPY
    class_code = 0xFF0000
    subsystem_id = 0x1100
    num_queues = 1
    queue_size = 256
    msix_vectors = 2
    guest_modules = ("virtio_pci", "virtio-rng")
    options = (
        Option("--packed", "offer the packed virtqueue layout (VIRTIO_F_RING_PACKED)",
               switch=True),
    )

    def __init__(self, *, packed: bool = False) -> None:
        self.ring_packed = packed
        super().__init__()
        #: bytes handed to the driver so far
        self.bytes_given = 0

    def process_queue(self, vq: Virtqueue) -> None:
        while (chain := vq.pop()) is not None:
            n = min(chain.writable_length, MAX_REQUEST)
            written = chain.write(os.urandom(n)) if n else 0
            self.bytes_given += written
            vq.push(chain, written)
