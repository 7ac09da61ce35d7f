"""Seed inputs of c_shim/fuzz_msg.c, written by c_shim/fuzz.sh into its corpus: whole
REGION_READ / REGION_WRITE accesses the fast path takes (the harness's regions: 1 readable,
3 and 7 read-write), split ones, and messages with fds, in both modes, so the fuzzer starts
from the shapes QEMU sends."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from vfio_user_server.protocol import codec  # noqa: E402
from vfio_user_server.protocol.constants import HEADER_SIZE, Command, HeaderFlag  # noqa: E402
from vfio_user_server.protocol.structs import IrqSet, RegionAccess  # noqa: E402


def message(msg_id: int, command: int, payload: bytes, flags: int = 0) -> bytes:
    return codec.encode_header(msg_id, command, HEADER_SIZE + len(payload), flags) + payload


def op(data: bytes, nfds: int = 0) -> bytes:
    """One read: the harness's op byte (length, fds), then the bytes."""
    if len(data) < 63:
        return bytes([nfds << 6 | len(data)]) + data
    return bytes([nfds << 6 | 63]) + len(data).to_bytes(2, "little") + data


def seeds() -> dict[str, bytes]:
    read = message(1, Command.REGION_READ, RegionAccess(0x10, 1, 4).pack())
    write = message(2, Command.REGION_WRITE, RegionAccess(0x20, 3, 4).pack() + b"abcd",
                    int(HeaderFlag.NO_REPLY))
    big = message(3, Command.REGION_WRITE, RegionAccess(0, 7, 512).pack() + bytes(512))
    dma_map = message(4, Command.DMA_MAP, bytes(32))
    eoi = message(5, Command.DEVICE_SET_IRQS, IrqSet(20, 0x11, 0, 0, 1).pack())  # INTx EOI
    out = {}
    for mode in (0x00, 0x80):
        cfg = mode | 0x04 | 12 << 3  # fast path on, 4 KiB of data per access
        out[f"accesses-{mode:x}"] = bytes([cfg]) + op(read) + op(write) + op(big)
        out[f"split-{mode:x}"] = bytes([cfg | 1]) + op(read[:10]) + op(read[10:] + write)
        out[f"fds-{mode:x}"] = bytes([cfg]) + op(dma_map, 1) + op(read) + op(write[:20], 2)
        out[f"eoi-{mode:x}"] = bytes([cfg]) + op(read + eoi) + op(eoi, 1) + op(eoi[:30])
    return out


if __name__ == "__main__":
    corpus = Path(sys.argv[1])
    corpus.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (corpus / f"seed-{name}").write_bytes(data)
