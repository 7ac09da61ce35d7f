"""End to end: Linux's ``virtio_pci``, ``virtio_rng`` and ``virtio_blk`` drivers in a guest under
QEMU's vfio-user-pci, on our virtio devices.

The devices are served in this process (so the tests can look at their state and backing
file). virtio-blk is booted with guest RAM as a shared memfd (direct DMA) and two vCPUs (two
request queues), and once more with plain RAM (every ring access and data byte by
DMA_READ/DMA_WRITE messages).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from blockdev_checks import (
    DiskGuest,
    check_flush_makes_writes_durable,
    check_guest_writes_land_in_the_file,
    check_host_writes_are_read_by_the_guest,
    check_mkfs_mount_and_use,
    check_read_after_reboot,
    write_for_reboot,
)

from vfio_user_devices.virtio_blk import VirtioBlk
from vfio_user_devices.virtio_rng import VirtioRng
from vfio_user_server.testing.harness import DeviceGuest
from vfio_user_server.testing.provision import Provisioned
from vfio_user_server.virtio import Status
from vfio_user_server.virtio.spec import F_RING_PACKED

pytestmark = pytest.mark.e2e

SIZE = 64 << 20
DISK = "/dev/vda"
#: ext4 (which mounts ext2) needs a crc32c driver and the guest has no modprobe to load one
BLK_MODULES = [*VirtioBlk.guest_modules, "ext4", "crc32c_generic"]


class BlkGuest(DiskGuest):
    @property
    def dev(self) -> VirtioBlk:
        dev = self.h.device
        assert isinstance(dev, VirtioBlk)
        return dev


def boot_blk(prov: Provisioned, *, shared_memory: bool, name: str, smp: int = 1,
             polled_notify: bool = False) -> Iterator[BlkGuest]:
    tmp = Path(tempfile.mkdtemp(prefix="virtio-blk-e2e-", dir="/tmp"))
    image = tmp / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    dev = VirtioBlk(image, queues=4, polled_notify=polled_notify)
    harness = DeviceGuest([dev], prov=prov, workdir=tmp / "work", modules=BLK_MODULES,
                          shared_memory=shared_memory, no_reboot=False, name=name, smp=smp)
    try:
        harness.start()
        g = BlkGuest(harness, image, DISK)
        g.wait_disk()
        yield g
    finally:
        harness.close()
        dev.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module", params=[False, True], ids=["trapped", "polled-notify"])
def blk_guest(request: pytest.FixtureRequest,
              vfio_user_provisioned: Provisioned) -> Iterator[BlkGuest]:
    polled: bool = request.param
    yield from boot_blk(vfio_user_provisioned, shared_memory=True, smp=2, polled_notify=polled,
                        name="virtio-blk-memfd-polled" if polled else "virtio-blk-memfd")


# --- virtio-rng -------------------------------------------------------------------------------


def test_rng_feeds_hwrng(vfio_user_provisioned: Provisioned) -> None:
    dev = VirtioRng()
    with DeviceGuest([dev], prov=vfio_user_provisioned, modules=list(VirtioRng.guest_modules),
                     name="virtio-rng") as h:
        h.run("for i in $(seq 100); do grep -q virtio /sys/class/misc/hw_random/rng_current "
              "&& break; sleep 0.1; done; [ -c /dev/hwrng ]", 60, check=True)
        current = h.run("cat /sys/class/misc/hw_random/rng_current", check=True).output
        assert current.strip().startswith("virtio_rng"), current
        driver = h.run("basename $(readlink /sys/bus/virtio/devices/virtio0/driver)",
                       check=True).output.strip()
        assert driver == "virtio_rng"
        given = dev.bytes_given
        out = h.run("dd if=/dev/hwrng bs=64 count=16 2>/dev/null | od -An -tx1 | tr -d ' \\n'",
                    60, check=True).output.strip()
        assert len(out) == 2 * 64 * 16
        assert out != "0" * len(out)
        assert dev.bytes_given >= given + 1024
        assert dev.status & Status.DRIVER_OK
        assert dev.msix is not None and dev.msix.enabled


# --- virtio-blk -------------------------------------------------------------------------------


def test_blk_binds_and_sizes(blk_guest: BlkGuest) -> None:
    g = blk_guest
    assert int(g.run("cat /sys/block/vda/size")) == SIZE // 512
    assert int(g.run("cat /sys/block/vda/queue/logical_block_size")) == 512
    driver = g.run("basename $(readlink /sys/block/vda/device/driver)").strip()
    assert driver == "virtio_blk"
    assert g.run("cat /sys/block/vda/serial").strip() == g.dev.serial  # GET_ID
    assert g.run("cat /sys/block/vda/ro").strip() == "0"
    # one request queue per vCPU (2 of the 4 offered), each with its own MSI-X vector
    assert int(g.run("ls /sys/block/vda/mq | wc -l")) == 2
    assert [q.enabled for q in g.dev.queues] == [True, True, False, False]
    vectors = [q.vector for q in g.dev.queues[:2]]
    assert len(set(vectors)) == 2 and g.dev.config_vector not in vectors
    assert g.dev.msix is not None and g.dev.msix.enabled
    assert g.dev.status & Status.DRIVER_OK and not g.dev.status & Status.DEVICE_NEEDS_RESET
    poller = g.dev._notify_poller
    if g.dev.polled_notify:  # the notifications came through the polled notify page
        assert poller is not None and poller.watcher.running and poller.watcher.changes > 0


def test_blk_guest_writes_land_in_the_file(blk_guest: BlkGuest) -> None:
    check_guest_writes_land_in_the_file(blk_guest)


def test_blk_host_writes_are_read_by_the_guest(blk_guest: BlkGuest) -> None:
    check_host_writes_are_read_by_the_guest(blk_guest)


def test_blk_flush(blk_guest: BlkGuest) -> None:
    check_flush_makes_writes_durable(blk_guest, lambda: blk_guest.dev.stats["flush"])


def test_blk_mkfs_mount_and_use(blk_guest: BlkGuest) -> None:
    check_mkfs_mount_and_use(blk_guest)


def test_blk_reboot_reattaches(blk_guest: BlkGuest) -> None:
    g = blk_guest
    want = write_for_reboot(g)
    g.h.guest.reboot()
    check_read_after_reboot(g, want)
    assert g.dev.status & Status.DRIVER_OK


def test_blk_plain_ram_uses_message_dma(vfio_user_provisioned: Provisioned) -> None:
    for g in boot_blk(vfio_user_provisioned, shared_memory=False, name="virtio-blk-plain"):
        assert not g.dev.dma.table.is_direct(0x100000, 4096)
        assert int(g.run("cat /sys/block/vda/size")) == SIZE // 512
        g.run("dd if=/dev/urandom of=/tmp/r bs=4096 count=40 2>/dev/null")
        want = g.guest_sha256("cat /tmp/r")
        g.run(f"dd if=/tmp/r of={DISK} bs=4096 seek=3 oflag=direct 2>&1")
        assert hashlib.sha256(g.host_bytes(3 * 4096, 40 * 4096)).hexdigest() == want
        assert g.guest_sha256(f"dd if={DISK} bs=4096 skip=3 count=40 iflag=direct "
                              "2>/dev/null") == want
        g.run(f"mke2fs -q {DISK} 2>&1 || mke2fs {DISK} 2>&1")
        g.run(f"mkdir -p /mnt && mount -t ext2 {DISK} /mnt && echo plain > /mnt/f && "
              "umount /mnt")
        g.run(f"mount -t ext2 {DISK} /mnt && [ \"$(cat /mnt/f)\" = plain ] && umount /mnt")


def test_blk_read_only_in_guest(vfio_user_provisioned: Provisioned) -> None:
    dev = VirtioBlk(size=8 << 20, read_only=True, queues=1)
    try:
        with DeviceGuest([dev], prov=vfio_user_provisioned, modules=BLK_MODULES,
                         name="virtio-blk-ro") as h:
            h.run(f"for i in $(seq 100); do [ -b {DISK} ] && break; sleep 0.1; done; "
                  f"[ -b {DISK} ]", 60, check=True)
            assert h.run("cat /sys/block/vda/ro", check=True).output.strip() == "1"
            assert not h.run(f"dd if=/dev/zero of={DISK} bs=4096 count=1 oflag=direct "
                             "2>&1").ok
            assert dev.stats["write"] == 0
    finally:
        dev.close()


def test_blk_packed_ring(vfio_user_provisioned: Provisioned) -> None:
    """Linux's virtio_ring takes the packed layout when it is offered."""
    tmp = Path(tempfile.mkdtemp(prefix="virtio-blk-packed-", dir="/tmp"))
    image = tmp / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    dev = VirtioBlk(image, queues=2, packed=True)
    try:
        with DeviceGuest([dev], prov=vfio_user_provisioned, workdir=tmp / "work",
                         modules=BLK_MODULES, name="virtio-blk-packed", smp=2) as h:
            g = BlkGuest(h, image, DISK)
            g.wait_disk()
            assert dev.has_feature(F_RING_PACKED)
            assert all(q.packed for q in dev.queues[:2])
            g.run("dd if=/dev/urandom of=/tmp/r bs=4096 count=300 2>/dev/null")
            want = g.guest_sha256("cat /tmp/r")
            g.run(f"dd if=/tmp/r of={DISK} bs=4096 seek=11 oflag=direct 2>&1")
            assert hashlib.sha256(g.host_bytes(11 * 4096, 300 * 4096)).hexdigest() == want
            assert g.guest_sha256(f"dd if={DISK} bs=4096 skip=11 count=300 iflag=direct "
                                  "2>/dev/null") == want
            g.run(f"mke2fs -q {DISK} 2>&1 || mke2fs {DISK} 2>&1")
            g.run(f"mkdir -p /mnt && mount -t ext2 {DISK} /mnt && "
                  "dd if=/dev/urandom of=/mnt/blob bs=1024 count=555 2>/dev/null")
            want = g.guest_sha256("cat /mnt/blob")
            g.run("umount /mnt && echo 3 > /proc/sys/vm/drop_caches")
            g.run(f"mount -t ext2 {DISK} /mnt")
            assert g.guest_sha256("cat /mnt/blob") == want
            g.run("umount /mnt")
            assert not dev.status & Status.DEVICE_NEEDS_RESET
    finally:
        dev.close()
        shutil.rmtree(tmp, ignore_errors=True)
