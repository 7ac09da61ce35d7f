"""End to end: Linux's ``nvme`` driver in a guest under QEMU's vfio-user-pci, on our controller.

The controller is served in this process (so the tests can look at its backing file and
counters); the guest is booted once per module with guest RAM as a shared memfd (direct DMA),
and once more with plain RAM (every queue entry and data page by DMA_READ/DMA_WRITE messages).
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

from vfio_user_devices.nvme import NvmeController
from vfio_user_devices.nvme_coalesce import TIME_UNIT
from vfio_user_server.testing.guestprog import guest_program
from vfio_user_server.testing.harness import Guest
from vfio_user_server.testing.provision import Provisioned

pytestmark = pytest.mark.e2e

SIZE = 64 << 20
DISK = "/dev/nvme0n1"
#: ext4 (which mounts ext2) needs a crc32c driver and the guest has no modprobe to load one
MODULES = ["nvme", "ext4", "crc32c_generic"]


class NvmeGuest(DiskGuest):
    @property
    def dev(self) -> NvmeController:
        dev = self.h.device
        assert isinstance(dev, NvmeController)
        return dev


def boot(prov: Provisioned, *, shared_memory: bool, name: str, smp: int = 1,
         polled_doorbells: bool = False) -> Iterator[NvmeGuest]:
    tmp = Path(tempfile.mkdtemp(prefix="nvme-e2e-", dir="/tmp"))
    image = tmp / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    dev = NvmeController(image, polled_doorbells=polled_doorbells)
    feat = guest_program("nvme_feat", source=Path(__file__).with_name("nvme_feat.c"))
    harness = Guest([dev], prov=prov, workdir=tmp / "work", modules=MODULES,
                    shared_memory=shared_memory, no_reboot=False, name=name, smp=smp,
                    files={"/bin/nvme_feat": feat})
    try:
        harness.start()
        g = NvmeGuest(harness, image, DISK)
        g.wait_disk()
        yield g
    finally:
        harness.close()
        dev.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module", params=[False, True], ids=["trapped", "polled-doorbells"])
def nvme_guest(request: pytest.FixtureRequest,
               vfio_user_provisioned: Provisioned) -> Iterator[NvmeGuest]:
    polled: bool = request.param
    yield from boot(vfio_user_provisioned, shared_memory=True, smp=2, polled_doorbells=polled,
                    name="nvme-memfd-polled" if polled else "nvme-memfd")


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
    if g.dev.doorbells is not None:  # --polled-doorbells: the watcher rang them
        assert g.dev.doorbells.watcher.running and g.dev.doorbells.watcher.changes > 0


def test_guest_writes_land_in_the_file(nvme_guest: NvmeGuest) -> None:
    check_guest_writes_land_in_the_file(nvme_guest)


def test_host_writes_are_read_by_the_guest(nvme_guest: NvmeGuest) -> None:
    check_host_writes_are_read_by_the_guest(nvme_guest)


def test_flush_makes_writes_durable(nvme_guest: NvmeGuest) -> None:
    check_flush_makes_writes_durable(nvme_guest, lambda: nvme_guest.dev.stats["flushes"])


def test_mkfs_mount_and_use(nvme_guest: NvmeGuest) -> None:
    check_mkfs_mount_and_use(nvme_guest)


def test_reboot_reattaches(nvme_guest: NvmeGuest) -> None:
    g = nvme_guest
    want = write_for_reboot(g)
    g.h.started_machine.reboot()
    check_read_after_reboot(g, want)
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
        mode = "polled doorbells" if g.dev.doorbells is not None else "trapped doorbells"
        print(f"\nnvme guest ({accel}, {mode}): {n / r.duration:.0f} 4 KiB {what}s/s at QD1")
    assert hashlib.sha256(g.host_bytes(start * bs, n * bs)).hexdigest() == want
    assert g.guest_sha256(f"dd if={DISK} bs={bs} skip={start} count={n} iflag=direct "
                          "2>/dev/null") == want


def test_interrupt_coalescing_set_by_the_guest(nvme_guest: NvmeGuest) -> None:
    """Features 08h and 09h through the admin passthrough ioctl (Linux's driver never sets
    them): the controller applies them, and I/O with coalescing on loses no completion (a
    lost interrupt would be the driver's 30 s timeout, and the data is checked)."""
    g = nvme_guest
    co = g.dev.coalescer
    try:
        assert g.run("nvme_feat /dev/nvme0 set 8 0x0a07").strip() == "result=0x0"
        assert co.threshold == 8 and co.delay == 10 * TIME_UNIT
        assert g.run("nvme_feat /dev/nvme0 get 8").strip() == "result=0xa07"
        g.run("nvme_feat /dev/nvme0 set 9 0x10002")  # Coalescing Disable on vector 2
        assert g.run("nvme_feat /dev/nvme0 get 9 2").strip() == "result=0x10002"
        before = co.timeouts
        n, bs, start = 200, 4096, 6000
        g.run(f"dd if=/dev/urandom of=/tmp/c bs={bs} count={n} 2>/dev/null")
        want = g.guest_sha256("cat /tmp/c")
        for cpu in (0, 1):  # a queue (and vector) per vCPU: one coalesced, one not
            g.run(f"taskset -c {cpu} dd if=/tmp/c of={DISK} bs={bs} seek={start} "
                  f"count={n} oflag=direct 2>&1")
            assert g.guest_sha256(f"taskset -c {cpu} dd if={DISK} bs={bs} skip={start} "
                                  f"count={n} iflag=direct 2>/dev/null") == want
        assert hashlib.sha256(g.host_bytes(start * bs, n * bs)).hexdigest() == want
        # QD1 never reaches 8 entries: the coalesced queue's completions came by the timer
        assert co.timeouts > before
    finally:
        g.run("nvme_feat /dev/nvme0 set 9 2")
        g.run("nvme_feat /dev/nvme0 set 8 0")
    assert co.threshold == 0 and co.held == {}


def test_plain_ram_uses_message_dma(vfio_user_provisioned: Provisioned) -> None:
    for g in boot(vfio_user_provisioned, shared_memory=False, name="nvme-plain"):
        assert not g.dev.dma.table.is_direct(0x100000, 4096)
        g.run("dd if=/dev/urandom of=/tmp/r bs=4096 count=40 2>/dev/null")
        want = g.guest_sha256("cat /tmp/r")
        g.run(f"dd if=/tmp/r of={DISK} bs=4096 seek=3 oflag=direct 2>&1")
        assert hashlib.sha256(g.host_bytes(3 * 4096, 40 * 4096)).hexdigest() == want
        assert g.guest_sha256(f"dd if={DISK} bs=4096 skip=3 count=40 iflag=direct "
                              "2>/dev/null") == want
