"""Devices with real Linux drivers, served by name by ``vfio-user-server``.

Installed as the package ``vfio_user_devices``:

* ``gpio-pci-idio-16``: :class:`vfio_user_devices.idio16.PciIdio16` (Linux: gpio-pci-idio-16)
* ``edu``: :class:`vfio_user_devices.edu.Edu` (QEMU's teaching device, docs/specs/edu.rst)
* ``nvme``: :class:`vfio_user_devices.nvme.NvmeController` (Linux: nvme)
* ``virtio-blk``: :class:`vfio_user_devices.virtio_blk.VirtioBlk` (Linux: virtio_pci, virtio_blk)
* ``virtio-rng``: :class:`vfio_user_devices.virtio_rng.VirtioRng` (Linux: virtio_pci, virtio-rng)
"""
