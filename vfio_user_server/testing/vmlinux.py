"""Extract the ELF ``vmlinux`` from a bzImage and find its PVH entry point (a port of Linux's
``scripts/extract-vmlinux``), for :mod:`.provision`, which keeps the ELF when it has a PVH
entry note so that QEMU boots it directly."""

from __future__ import annotations

import bz2
import importlib
import lzma
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable, Sequence

from vfio_user_server.errors import ProvisioningError

__all__ = ["ZstdDecoder", "extract_vmlinux", "pvh_entry"]

_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b\x08"),
    ("xz", b"\xfd7zXZ\x00"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
)

ZstdDecoder = Callable[[bytes], bytes]


def _zstd_decoder(cmd: Sequence[str] | None) -> ZstdDecoder | None:
    """A zstd decompressor: Python 3.14's ``compression.zstd``, else a ``zstd`` command."""
    try:
        mod = importlib.import_module("compression.zstd")
    except ImportError:
        mod = None
    if mod is not None:
        decompress: ZstdDecoder = mod.decompress
        return decompress
    argv = list(cmd) if cmd else ([shutil.which("zstd")] if shutil.which("zstd") else None)
    if not argv:
        return None
    final = [a for a in argv if a is not None]

    def run(data: bytes) -> bytes:
        proc = subprocess.run(
            [*final, "-q", "-d", "-c"], input=data, capture_output=True, timeout=300, check=False
        )
        # Trailing bytes after the frame make zstd complain but the output is complete.
        return proc.stdout

    return run


def _decompress(kind: str, data: bytes, zstd: ZstdDecoder | None) -> bytes:
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    if kind == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    if kind == "lzma":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    if kind == "zstd":
        if zstd is None:
            raise ProvisioningError("the kernel is zstd-compressed and no zstd decoder exists")
        return zstd(data)
    raise ValueError(kind)


def _is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def extract_vmlinux(bzimage: bytes, zstd_cmd: Sequence[str] | None = None) -> bytes:
    """Return the uncompressed ELF ``vmlinux`` inside an x86 bzImage.

    Uses the boot header's ``payload_offset``/``payload_length`` when present, else scans for
    the magic of each compression format as Linux's ``scripts/extract-vmlinux`` does.
    """
    zstd = _zstd_decoder(zstd_cmd)
    if _is_elf(bzimage):
        return bzimage
    candidates: list[tuple[str, int, int | None]] = []
    if len(bzimage) > 0x250 and bzimage[0x202:0x206] == b"HdrS":
        (hdr_version,) = struct.unpack_from("<H", bzimage, 0x206)
        setup_sects = bzimage[0x1F1] or 4
        if hdr_version >= 0x208:
            off, length = struct.unpack_from("<II", bzimage, 0x248)
            start = (setup_sects + 1) * 512 + off
            payload = bzimage[start : start + length]
            for kind, magic in _MAGICS:
                if payload.startswith(magic):
                    candidates.append((kind, start, length))
    for kind, magic in _MAGICS:
        pos = bzimage.find(magic)
        while pos != -1:
            candidates.append((kind, pos, None))
            pos = bzimage.find(magic, pos + 1)
    errors: list[str] = []
    for kind, start, length in candidates:
        data = bzimage[start:] if length is None else bzimage[start : start + length]
        try:
            out = _decompress(kind, data, zstd)
        except ProvisioningError:
            raise
        except Exception as exc:
            errors.append(f"{kind}@{start}: {exc}")
            continue
        if _is_elf(out):
            return out
    raise ProvisioningError(
        "no compressed ELF kernel found in the bzImage" + (f" ({errors[:3]})" if errors else "")
    )


XEN_ELFNOTE_PHYS32_ENTRY = 18


def pvh_entry(elf: bytes) -> int | None:
    """The PVH entry point from the ``XEN_ELFNOTE_PHYS32_ENTRY`` note of an ELF64, or None."""
    if not _is_elf(elf) or elf[4] != 2 or elf[5] != 1:
        return None
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 56 > len(elf):
            break
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", elf, base)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, min(p_offset + p_filesz, len(elf))
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            desc_at = pos + 12 + ((namesz + 3) & ~3)
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                if descsz == 4:
                    return int(struct.unpack_from("<I", elf, desc_at)[0])
                if descsz == 8:
                    return int(struct.unpack_from("<Q", elf, desc_at)[0])
            pos = desc_at + ((descsz + 3) & ~3)
    return None
