"""End to end: Linux's ``nvme`` driver in a guest under QEMU's vfio-user-pci, on our controller.

The controller is served in this process (so the tests can look at its backing file and
counters); the guest is booted once per module with guest RAM as a shared memfd (direct DMA),
and once more with plain RAM (every queue entry and data page by DMA_READ/DMA_WRITE messages).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfio_user_devices.nvme import NvmeController
from vfio_user_server.testing.harness import Guest
from vfio_user_server.testing.provision import Provisioned

pytestmark = pytest.mark.e2e

SIZE = 64 << 20
DISK = "/dev/nvme0n1"
#: ext4 (which mounts ext2) needs a crc32c driver and the guest has no modprobe to load one
MODULES = ["nvme", "ext4", "crc32c_generic"]


class NvmeGuest:
    def __init__(self, harness: Guest, image: Path) -> None:
        self.h = harness
        self.image = image

    @property
    def dev(self) -> NvmeController:
        dev = self.h.device
        assert isinstance(dev, NvmeController)
        return dev

    def run(self, command: str, timeout: float = 120.0) -> str:
        return self.h.run(command, timeout, check=True).output

    def host_bytes(self, offset: int, length: int) -> bytes:
        with open(self.image, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def guest_sha256(self, command: str) -> str:
        return self.run(f"{command} | sha256sum").split()[0]


def boot(prov: Provisioned, *, shared_memory: bool, name: str, smp: int = 1
         ) -> Iterator[NvmeGuest]:
    tmp = Path(tempfile.mkdtemp(prefix="nvme-e2e-", dir="/tmp"))
    image = tmp / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    dev = NvmeController(image)
    harness = Guest([dev], prov=prov, workdir=tmp / "work", modules=MODULES,
                          shared_memory=shared_memory, no_reboot=False, name=name, smp=smp)
    try:
        harness.start()
        g = NvmeGuest(harness, image)
        g.run(f"for i in $(seq 100); do [ -b {DISK} ] && break; sleep 0.1; done; "
              f"[ -b {DISK} ]", timeout=60)
        yield g
    finally:
        harness.close()
        dev.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def nvme_guest(vfio_user_provisioned: Provisioned) -> Iterator[NvmeGuest]:
    yield from boot(vfio_user_provisioned, shared_memory=True, name="nvme-memfd", smp=2)


def test_driver_binds_and_sizes(nvme_guest: NvmeGuest) -> None:
    g = nvme_guest
    assert int(g.run("cat /sys/block/nvme0n1/size")) == SIZE // 512
    assert int(g.run("cat /sys/block/nvme0n1/queue/logical_block_size")) == 512
    assert g.run("cat /sys/class/nvme/nvme0/model").strip() == "pyvfio-user NVMe"
    assert g.run("cat /sys/class/nvme/nvme0/serial").strip() == g.dev.serial
    assert g.run("cat /sys/class/nvme/nvme0/state").strip() == "live"
    driver = g.run("basename $(readlink /sys/class/nvme/nvme0/device/driver)").strip()
    assert driver == "nvme"
    # one I/O queue per vCPU (2) with its own MSI-X vector, and the admin queue
    irqs = g.run("cat /proc/interrupts")
    assert all(f"nvme0q{i}" in irqs for i in range(3)), irqs
    assert set(g.dev.sqs) == {0, 1, 2}
    assert sorted(cq.iv for cq in g.dev.cqs.values()) == [0, 1, 2]
    assert g.dev.msix is not None and g.dev.msix.enabled


def test_guest_writes_land_in_the_file(nvme_guest: NvmeGuest) -> None:
    g = nvme_guest
    g.run("dd if=/dev/urandom of=/tmp/r bs=4096 count=300 2>/dev/null")
    want = g.guest_sha256("cat /tmp/r")
    # 1.2 MiB at an odd offset: several max-size (128 KiB) commands with PRP lists
    g.run(f"dd if=/tmp/r of={DISK} bs=4096 seek=77 oflag=direct 2>&1")
    assert hashlib.sha256(g.host_bytes(77 * 4096, 300 * 4096)).hexdigest() == want
    assert g.guest_sha256(f"dd if={DISK} bs=4096 skip=77 count=300 iflag=direct 2>/dev/null") \
        == want


def test_host_writes_are_read_by_the_guest(nvme_guest: NvmeGuest) -> None:
    g = nvme_guest
    data = os.urandom(512 * 1000 + 512)
    with open(g.image, "r+b") as f:
        f.seek(5 << 20)
        f.write(data)
    want = hashlib.sha256(data).hexdigest()
    got = g.guest_sha256(f"dd if={DISK} bs=512 skip={(5 << 20) // 512} count=1001 "
                         "iflag=direct 2>/dev/null")
    assert got == want
    # through the page cache too, after dropping it
    g.run("sync; echo 3 > /proc/sys/vm/drop_caches")
    got = g.guest_sha256(f"dd if={DISK} bs=512 skip={(5 << 20) // 512} count=1001 2>/dev/null")
    assert got == want


def test_flush_makes_writes_durable(nvme_guest: NvmeGuest) -> None:
    g = nvme_guest
    before = g.dev.stats["flushes"]
    g.run(f"dd if=/dev/urandom of={DISK} bs=4096 seek=500 count=4 conv=fsync 2>&1")
    assert g.dev.stats["flushes"] > before
    # buffered writes: in the file only after the page cache is written back, and a flush
    g.run("dd if=/dev/urandom of=/tmp/w bs=4096 count=8 2>/dev/null")
    want = g.guest_sha256("cat /tmp/w")
    before = g.dev.stats["flushes"]
    g.run(f"dd if=/tmp/w of={DISK} bs=4096 seek=600 2>&1 && sync -d {DISK}")
    assert g.dev.stats["flushes"] > before
    assert hashlib.sha256(g.host_bytes(600 * 4096, 8 * 4096)).hexdigest() == want


def test_mkfs_mount_and_use(nvme_guest: NvmeGuest) -> None:
    g = nvme_guest
    g.run(f"mke2fs -q {DISK} 2>&1 || mke2fs {DISK} 2>&1")
    assert g.host_bytes(1024 + 56, 2) == b"\x53\xef"  # ext2 superblock magic, durable
    g.run(f"mkdir -p /mnt && mount -t ext2 {DISK} /mnt")
    g.run("dd if=/dev/urandom of=/mnt/blob bs=1024 count=777 2>/dev/null && "
          "mkdir /mnt/d && echo hello > /mnt/d/file")
    want = g.guest_sha256("cat /mnt/blob")
    g.run("umount /mnt && echo 3 > /proc/sys/vm/drop_caches")
    g.run(f"mount -t ext2 {DISK} /mnt")
    assert g.guest_sha256("cat /mnt/blob") == want
    assert g.run("cat /mnt/d/file").strip() == "hello"
    g.run("umount /mnt")


def test_reboot_reattaches(nvme_guest: NvmeGuest) -> None:
    g = nvme_guest
    g.run(f"dd if=/dev/urandom of=/tmp/r bs=4096 count=16 2>/dev/null && "
          f"dd if=/tmp/r of={DISK} bs=4096 seek=1000 oflag=direct 2>&1")
    want = g.guest_sha256("cat /tmp/r")
    g.h.started_machine.reboot()
    g.run(f"for i in $(seq 100); do [ -b {DISK} ] && break; sleep 0.1; done; [ -b {DISK} ]")
    assert g.guest_sha256(f"dd if={DISK} bs=4096 skip=1000 count=16 iflag=direct 2>/dev/null") \
        == want
    assert g.run("cat /sys/class/nvme/nvme0/state").strip() == "live"


def test_qd1_latency(nvme_guest: NvmeGuest) -> None:
    """4 KiB O_DIRECT writes, then reads, at queue depth 1: each is one 4 KiB command at the
    controller, and the bytes read back are the bytes written. The rates are printed (-s)."""
    g = nvme_guest
    n, bs, start = 1000, 4096, 2000
    g.run(f"dd if=/dev/urandom of=/tmp/q bs={bs} count={n} 2>/dev/null")
    want = g.guest_sha256("cat /tmp/q")
    stats = g.dev.stats
    for what, cmd in (("write", f"dd if=/tmp/q of={DISK} bs={bs} seek={start} count={n} "
                                "oflag=direct"),
                      ("read", f"dd if={DISK} of=/dev/null bs={bs} skip={start} count={n} "
                               "iflag=direct")):
        before = dict(stats)
        r = g.h.run(cmd + " 2>&1", 300, check=True)
        assert r.output == f"{n}+0 records in\n{n}+0 records out\n"
        # nothing else touches the disk meanwhile: one controller command per dd block
        assert stats[what + "s"] - before[what + "s"] == n
        assert stats[what + "_bytes"] - before[what + "_bytes"] == n * bs
        accel = g.h.started_machine.accel
        print(f"\nnvme guest ({accel}): {n / r.duration:.0f} 4 KiB {what}s/s at QD1")
    assert hashlib.sha256(g.host_bytes(start * bs, n * bs)).hexdigest() == want
    assert g.guest_sha256(f"dd if={DISK} bs={bs} skip={start} count={n} iflag=direct "
                          "2>/dev/null") == want


def test_plain_ram_uses_message_dma(vfio_user_provisioned: Provisioned) -> None:
    for g in boot(vfio_user_provisioned, shared_memory=False, name="nvme-plain"):
        assert not g.dev.dma.table.is_direct(0x100000, 4096)
        g.run("dd if=/dev/urandom of=/tmp/r bs=4096 count=40 2>/dev/null")
        want = g.guest_sha256("cat /tmp/r")
        g.run(f"dd if=/tmp/r of={DISK} bs=4096 seek=3 oflag=direct 2>&1")
        assert hashlib.sha256(g.host_bytes(3 * 4096, 40 * 4096)).hexdigest() == want
        assert g.guest_sha256(f"dd if={DISK} bs=4096 skip=3 count=40 iflag=direct "
                              "2>/dev/null") == want
