"""Testing kits: device unit tests over the real protocol, and guest tests under QEMU.

* :func:`serve` (from :mod:`vfio_user_server.testing.serve`): a device on a temporary socket
  with a connected, negotiated :class:`~vfio_user_server.client.Client`, for device unit tests
  without a guest.
* :mod:`vfio_user_server.testing.provision` finds or downloads a QEMU with ``vfio-user-pci``,
  a Debian guest kernel with its modules, and a static busybox (stdlib only).
* :mod:`vfio_user_server.testing.initramfs` builds a gzip'd newc initramfs in pure Python.
* :mod:`vfio_user_server.testing.guest` starts a guest machine (restored from a template
  snapshot of :mod:`vfio_user_server.testing.snapshot`, or booted cold), attaches vfio-user
  sockets and runs commands in it; :mod:`vfio_user_server.testing.harness` adds the device
  servers (``Guest``, the pytest plugin's ``guest`` fixture).
"""

from .serve import Served, serve

__all__ = ["Served", "serve"]
