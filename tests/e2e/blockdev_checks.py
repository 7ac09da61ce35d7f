"""The block-device checks every disk the guest-test kit serves must pass (NVMe, virtio-blk).

A ``DiskGuest`` is a booted guest with one disk at ``disk`` backed by the host file ``image``;
the checks write random data from the guest and read it in the file, write it in the file and
read it in the guest, flush, and make, mount and use an ext2 file system on the disk.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from vfio_user_server.testing.harness import Guest


class DiskGuest:
    """A guest (``h``) with the disk ``disk`` that the host file ``image`` backs."""

    def __init__(self, harness: Guest, image: Path, disk: str) -> None:
        self.h = harness
        self.image = image
        self.disk = disk

    def run(self, command: str, timeout: float = 120.0) -> str:
        return self.h.run(command, timeout, check=True).output

    def host_bytes(self, offset: int, length: int) -> bytes:
        with open(self.image, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def guest_sha256(self, command: str) -> str:
        return self.run(f"{command} | sha256sum").split()[0]

    def wait_disk(self) -> None:
        disk = self.disk
        self.run(f"for i in $(seq 100); do [ -b {disk} ] && break; sleep 0.1; done; "
                 f"[ -b {disk} ]", timeout=60)


def check_guest_writes_land_in_the_file(g: DiskGuest) -> None:
    disk = g.disk
    g.run("dd if=/dev/urandom of=/tmp/r bs=4096 count=300 2>/dev/null")
    want = g.guest_sha256("cat /tmp/r")
    # 1.2 MiB at an odd offset: several max-size requests
    g.run(f"dd if=/tmp/r of={disk} bs=4096 seek=77 oflag=direct 2>&1")
    assert hashlib.sha256(g.host_bytes(77 * 4096, 300 * 4096)).hexdigest() == want
    assert g.guest_sha256(f"dd if={disk} bs=4096 skip=77 count=300 iflag=direct 2>/dev/null") \
        == want


def check_host_writes_are_read_by_the_guest(g: DiskGuest) -> None:
    disk = g.disk
    data = os.urandom(512 * 1000 + 512)
    with open(g.image, "r+b") as f:
        f.seek(5 << 20)
        f.write(data)
    want = hashlib.sha256(data).hexdigest()
    got = g.guest_sha256(f"dd if={disk} bs=512 skip={(5 << 20) // 512} count=1001 "
                         "iflag=direct 2>/dev/null")
    assert got == want
    # through the page cache too, after dropping it
    g.run("sync; echo 3 > /proc/sys/vm/drop_caches")
    got = g.guest_sha256(f"dd if={disk} bs=512 skip={(5 << 20) // 512} count=1001 2>/dev/null")
    assert got == want


def check_flush_makes_writes_durable(g: DiskGuest, flushes: Callable[[], int]) -> None:
    """``flushes()`` is the device's count of flush commands."""
    disk = g.disk
    before = flushes()
    g.run(f"dd if=/dev/urandom of={disk} bs=4096 seek=500 count=4 conv=fsync 2>&1")
    assert flushes() > before
    # buffered writes: in the file only after the page cache is written back, and a flush
    g.run("dd if=/dev/urandom of=/tmp/w bs=4096 count=8 2>/dev/null")
    want = g.guest_sha256("cat /tmp/w")
    before = flushes()
    g.run(f"dd if=/tmp/w of={disk} bs=4096 seek=600 2>&1 && sync -d {disk}")
    assert flushes() > before
    assert hashlib.sha256(g.host_bytes(600 * 4096, 8 * 4096)).hexdigest() == want


def check_mkfs_mount_and_use(g: DiskGuest) -> None:
    disk = g.disk
    g.run(f"mke2fs -q {disk} 2>&1 || mke2fs {disk} 2>&1")
    assert g.host_bytes(1024 + 56, 2) == b"\x53\xef"  # ext2 superblock magic, durable
    g.run(f"mkdir -p /mnt && mount -t ext2 {disk} /mnt")
    g.run("dd if=/dev/urandom of=/mnt/blob bs=1024 count=777 2>/dev/null && "
          "mkdir /mnt/d && echo hello > /mnt/d/file")
    want = g.guest_sha256("cat /mnt/blob")
    g.run("umount /mnt && echo 3 > /proc/sys/vm/drop_caches")
    g.run(f"mount -t ext2 {disk} /mnt")
    assert g.guest_sha256("cat /mnt/blob") == want
    assert g.run("cat /mnt/d/file").strip() == "hello"
    g.run("umount /mnt")


def write_for_reboot(g: DiskGuest) -> str:
    """Write 16 random blocks at block 1000 before a reboot; their sha256."""
    g.run(f"dd if=/dev/urandom of=/tmp/r bs=4096 count=16 2>/dev/null && "
          f"dd if=/tmp/r of={g.disk} bs=4096 seek=1000 oflag=direct 2>&1")
    return g.guest_sha256("cat /tmp/r")


def check_read_after_reboot(g: DiskGuest, want: str) -> None:
    """After the reboot the disk is back and holds what ``write_for_reboot`` wrote."""
    g.wait_disk()
    assert g.guest_sha256(f"dd if={g.disk} bs=4096 skip=1000 count=16 iflag=direct "
                          "2>/dev/null") == want
