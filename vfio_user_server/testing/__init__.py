"""Guest-test kit: provisioning of QEMU and a Linux guest, initramfs building, the QEMU runner.

* :mod:`vfio_user_server.testing.provision` finds or downloads a QEMU with ``vfio-user-pci``,
  a Debian guest kernel with its modules, and a static busybox (stdlib only).
* :mod:`vfio_user_server.testing.initramfs` builds a gzip'd newc initramfs in pure Python.
* :mod:`vfio_user_server.testing.guest` boots a guest, attaches vfio-user sockets and runs
  commands in it.
"""
