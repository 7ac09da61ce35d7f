"""Virtio devices in Python: the modern virtio-pci transport and split virtqueues.

* :class:`VirtioPciDevice` (:mod:`.pci`): the transport, a
  :class:`~vfio_user_server.device.PciDevice` that a virtio device subclasses;
* :class:`Virtqueue`, :class:`PackedVirtqueue`, :class:`Chain`, :class:`VirtqueueError`
  (:mod:`.virtqueue`): the split and packed rings as the device sees them;
* :mod:`.spec`: the numbers of the virtio 1.x specification.

Nothing here knows the vfio-user wire format: guest memory is reached through
:mod:`vfio_user_server.dma`.
"""

from .packed import PackedVirtqueue
from .pci import VirtioPciDevice
from .spec import DeviceId, Status
from .virtqueue import Chain, Virtqueue, VirtqueueError

__all__ = ["Chain", "DeviceId", "PackedVirtqueue", "Status", "VirtioPciDevice", "Virtqueue",
           "VirtqueueError"]
