"""virtio-blk: a block device (virtio device ID 2) backed by a raw image file or memory.

Served as ``vfio-user-server --socket S virtio-blk [--image PATH] [--size SIZE] [--queues N]
[--read-only] [--serial S] [--packed] [--inline on|off]``; Linux binds ``virtio_pci`` then
``virtio_blk`` (``/dev/vda``).

Features offered: SEG_MAX, BLK_SIZE (512), FLUSH, MQ (up to :data:`MAX_QUEUES` request queues;
Linux uses one per vCPU up to that), and DISCARD and WRITE_ZEROES unless read-only; RO with
``--read-only``. Requests (5.2.6): a 16-byte header (type, ioprio, sector) in device-readable
memory, data, and a status byte at the end of the device-writable memory:

=============  ==========================================================================
IN (0)         read ``len(data)`` bytes (a multiple of 512) from ``sector``
OUT (1)        write (IOERR on a read-only device)
FLUSH (4)      ``fsync`` the image
GET_ID (8)     the serial number, 20 bytes (NUL padded)
DISCARD (11)   punch holes (segments of sector, count, flags; the unmap flag is UNSUPP)
WRITE_ZEROES   zero ranges (punching holes when the unmap flag allows and the file can)
(13)
=============  ==========================================================================

A request outside the disk, or of a bad length, completes with IOERR; a request without a
header or status byte breaks the ring rules and sets DEVICE_NEEDS_RESET. Data moves between the
file and guest memory with ``preadv``/``pwritev`` on the mmapped guest pages when guest RAM
has fds, and through DMA_READ/DMA_WRITE messages otherwise. Reads, writes and GET_ID in
fd-backed memory run on the loop thread, right in the notify write (``--inline on``, the
default: measured faster than the hand-off, BENCHMARKS.md); everything else, and every request
with ``--inline off``, runs on the connection's worker thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time

from vfio_user_server.dma import Segment
from vfio_user_server.errors import DeviceDefinitionError, DmaError
from vfio_user_server.options import Option
from vfio_user_server.virtio import Chain, DeviceId, VirtioPciDevice, Virtqueue, VirtqueueError
from vfio_user_server.virtio.spec import bit

from .nvme_backend import FileBackend, parse_size

__all__ = ["MAX_QUEUES", "VirtioBlk"]

log = logging.getLogger(__name__)

SECTOR = 512
MAX_QUEUES = 16
QUEUE_SIZE = 256
#: Largest data transfer of one request.
MAX_TRANSFER = 32 << 20
#: Discard / write-zeroes limits (sectors per segment, segments per request).
MAX_DISCARD_SECTORS = 0x3FFFFF
MAX_DISCARD_SEG = 256
ID_BYTES = 20

# feature bits (5.2.3)
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_MQ = 12
F_DISCARD = 13
F_WRITE_ZEROES = 14

# request types and status
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")
DISCARD_F_UNMAP = 1

#: struct virtio_blk_config up to write_zeroes_may_unmap (and its padding)::
#:
#:   0x00 le64 capacity          0x14 le32 blk_size          0x28 le32 max_discard_seg
#:   0x08 le32 size_max          0x18 topology (8 bytes)     0x2C le32 discard_sector_alignment
#:   0x0C le32 seg_max           0x20 u8 writeback, pad      0x30 le32 max_write_zeroes_sectors
#:   0x10 geometry (4 bytes)     0x22 le16 num_queues        0x34 le32 max_write_zeroes_seg
#:                               0x24 le32 max_discard_sectors  0x38 u8 write_zeroes_may_unmap
CONFIG = struct.Struct("<QII4xI8xBxHIIIIIB3x")


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise ValueError(f"expected on or off, not {text!r}")
    return text == "on"


class _IoError(Exception):
    """The request fails with a status (IOERR or UNSUPP)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class VirtioBlk(VirtioPciDevice):
    """The block device described in the module docstring."""

    virtio_device_id = DeviceId.BLOCK
    class_code = 0x018000  # mass storage, other
    subsystem_id = 0x1100
    queue_size = QUEUE_SIZE
    msix_vectors = MAX_QUEUES + 1
    config_size = CONFIG.size
    guest_modules = ("virtio_pci", "virtio_blk")
    options = (
        Option("--image", "raw image file (created with --size if missing)"),
        Option("--size", "disk size (e.g. 64M, 2G); without --image: in memory",
               type=parse_size),
        Option("--read-only", "offer VIRTIO_BLK_F_RO and refuse writes", switch=True),
        Option("--queues", f"request queues offered (1..{MAX_QUEUES}, default 4)", type=int,
               default=4),
        Option("--serial", "serial number (GET_ID; default: derived from the image)"),
        Option("--packed", "offer the packed virtqueue layout (VIRTIO_F_RING_PACKED)",
               switch=True),
        Option("--inline", "on (default): reads and writes in fd-backed guest RAM run on the "
               "loop thread, inside the notify write; off: every request goes to the worker "
               "thread", type=_on_off, default=True, metavar="on|off"),
        Option("--polled-notify", "map the notify area into the guest and poll it with a "
               "thread (no message per notification; QEMU then posts no writes)", switch=True),
    )

    def __init__(
        self,
        image: str | os.PathLike[str] | None = None,
        size: int | None = None,
        *,
        read_only: bool = False,
        queues: int = 4,
        serial: str | None = None,
        backend: FileBackend | None = None,
        packed: bool = False,
        inline: bool = True,
        polled_notify: bool = False,
    ) -> None:
        if not 1 <= queues <= MAX_QUEUES:
            raise DeviceDefinitionError(f"virtio-blk: queues must be 1..{MAX_QUEUES}")
        if backend is None:
            if image is not None:
                backend = _open_image(image, size, read_only)
            else:
                backend = FileBackend.memory(size if size is not None else 64 << 20)
        self.backend = backend
        self.read_only = read_only
        self.sectors = backend.size // SECTOR
        self.num_queues = queues
        self.ring_packed = packed
        self.inline = inline
        self.polled_notify = polled_notify
        features = bit(F_SEG_MAX) | bit(F_BLK_SIZE) | bit(F_FLUSH) | bit(F_MQ)
        if read_only:
            features |= bit(F_RO)
        else:
            features |= bit(F_DISCARD) | bit(F_WRITE_ZEROES)
        self.device_features = features
        if serial is None:
            seed = (os.path.realpath(backend.path) if backend.path
                    else f"mem-{os.getpid()}-{id(self)}-{time.time_ns()}")
            serial = "PYV" + hashlib.sha256(seed.encode()).hexdigest()[:12].upper()
        self.serial = serial
        #: completed requests by type (tests, statistics)
        self.stats: dict[str, int] = {"read": 0, "write": 0, "flush": 0, "get_id": 0,
                                      "discard": 0, "write_zeroes": 0, "error": 0}
        super().__init__()

    def close(self) -> None:
        if self._notify_poller is not None:
            self._notify_poller.close()
        self.backend.close()

    # --- virtio -------------------------------------------------------------------------------
    def virtio_config(self) -> bytes:
        return CONFIG.pack(
            self.sectors, 0, self.queue_size - 2, SECTOR, 0, self.num_queues,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 8, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG,
            int(self.backend.can_punch))

    def inline_ok(self, chain: Chain) -> bool:
        # reads, writes and GET_ID; a flush (fdatasync), discard or write-zeroes can take long
        # and would hold up every message of the connection, so the worker runs those
        if chain.readable_length < HEADER.size:
            return True  # refused inline as malformed
        return HEADER.unpack(chain.read(0, HEADER.size))[0] in (T_IN, T_OUT, T_GET_ID)

    def process_queue(self, vq: Virtqueue) -> None:
        while (chain := vq.pop()) is not None:
            vq.push(chain, self._request(chain))

    def _request(self, chain: Chain) -> int:
        """Execute one request; the bytes written into the chain (data and status)."""
        if chain.readable_length < HEADER.size or chain.writable_length < 1:
            raise VirtqueueError("virtio-blk request without header or status byte")
        kind, _ioprio, sector = HEADER.unpack(chain.read(0, HEADER.size))
        status_at = chain.writable_length - 1
        written = 0
        try:
            if kind == T_IN:
                written = self._read(chain, sector, status_at)
                self.stats["read"] += 1
            elif kind == T_OUT:
                self._write(chain, sector)
                self.stats["write"] += 1
            elif kind == T_FLUSH:
                self._flush()
                self.stats["flush"] += 1
            elif kind == T_GET_ID:
                ident = self.serial.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")
                written = chain.write(ident[:status_at])
                self.stats["get_id"] += 1
            elif kind in (T_DISCARD, T_WRITE_ZEROES) and not self.read_only:
                self._discard(chain, kind)
                self.stats["discard" if kind == T_DISCARD else "write_zeroes"] += 1
            else:
                raise _IoError(S_UNSUPP, f"request type {kind}")
            status = S_OK
        except _IoError as exc:
            log.debug("virtio-blk: request type %d failed: %s", kind, exc)
            self.stats["error"] += 1
            status = exc.status
        except OSError as exc:
            log.error("virtio-blk: image I/O failed: %s", exc)
            self.stats["error"] += 1
            status = S_IOERR
        chain.write(bytes([status]), status_at)
        return written + 1

    def _range(self, sector: int, length: int) -> int:
        if length % SECTOR:
            raise _IoError(S_IOERR, f"length {length} is not a multiple of {SECTOR}")
        if length > MAX_TRANSFER:
            raise _IoError(S_IOERR, f"transfer of {length} bytes")
        if sector + length // SECTOR > self.sectors:
            raise _IoError(S_IOERR, f"sectors {sector}+{length // SECTOR} > {self.sectors}")
        return sector * SECTOR

    def _read(self, chain: Chain, sector: int, length: int) -> int:
        offset = self._range(sector, length)
        pieces = chain.writable_slice(0, length)
        segs = self._direct(pieces, write=True)
        if segs is not None:
            try:
                self.backend.readv([s.view for s in segs if s.view is not None], offset)
            finally:
                for s in segs:
                    s.release()
        else:
            chain.write(self.backend.read(offset, length))
        return length

    def _write(self, chain: Chain, sector: int) -> None:
        if self.read_only:
            raise _IoError(S_IOERR, "write to a read-only disk")
        length = chain.readable_length - HEADER.size
        offset = self._range(sector, length)
        pieces = chain.readable_slice(HEADER.size, length)
        segs = self._direct(pieces, write=False)
        if segs is not None:
            try:
                self.backend.writev([s.view for s in segs if s.view is not None], offset)
            finally:
                for s in segs:
                    s.release()
        else:
            self.backend.write(offset, chain.read(HEADER.size, length))

    def _flush(self) -> None:
        if not self.read_only:
            self.backend.sync()  # fdatasync (FileBackend.sync)

    def _discard(self, chain: Chain, kind: int) -> None:
        length = chain.readable_length - HEADER.size
        if length % SEGMENT.size or not length or length // SEGMENT.size > MAX_DISCARD_SEG:
            raise _IoError(S_IOERR, f"{length} bytes of discard segments")
        raw = chain.read(HEADER.size, length)
        ranges = []
        for i in range(length // SEGMENT.size):
            sector, count, flags = SEGMENT.unpack_from(raw, i * SEGMENT.size)
            if flags & ~DISCARD_F_UNMAP:
                raise _IoError(S_UNSUPP, f"segment flags {flags:#x}")
            if kind == T_DISCARD and flags & DISCARD_F_UNMAP:
                raise _IoError(S_UNSUPP, "discard with the unmap flag")
            if count > MAX_DISCARD_SECTORS or sector + count > self.sectors:
                raise _IoError(S_IOERR, f"segment {sector}+{count}")
            ranges.append((sector * SECTOR, count * SECTOR))
        for offset, n in ranges:
            if not n:
                continue
            if kind == T_DISCARD:
                self.backend.deallocate(offset, n)
            else:
                self.backend.zero(offset, n)

    def _direct(self, pieces: list[tuple[int, int]], *, write: bool) -> list[Segment] | None:
        """Memoryviews of guest memory for ``pieces``, or None where message DMA is needed."""
        table = self.dma.table
        segs: list[Segment] = []
        try:
            for addr, n in pieces:
                segs.extend(table.translate(addr, n, write))
        except DmaError as exc:
            for s in segs:
                s.release()
            raise VirtqueueError(f"data buffer: {exc}") from exc
        if all(s.view is not None for s in segs):
            return segs
        for s in segs:
            s.release()
        return None


def _open_image(path: str | os.PathLike[str], size: int | None, read_only: bool
                ) -> FileBackend:
    if not read_only:
        return FileBackend.open(path, size)
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise DeviceDefinitionError(f"virtio-blk: cannot open image {p!r}: {exc}") from exc
    actual = os.fstat(fd).st_size
    actual -= actual % SECTOR
    if actual <= 0:
        os.close(fd)
        raise DeviceDefinitionError(f"virtio-blk: image {p!r} is smaller than one sector")
    return FileBackend(fd, actual, path=p)
