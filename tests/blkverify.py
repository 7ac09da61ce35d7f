"""The host's side of the guest program ``blkverify``
(vfio_user_server/testing/guest_programs/blkverify.c).

:func:`check_image` replays the program's picks and sector contents for a seed and judges a
backing image after a fault: every block written by a generation up to the last one the guest
saw flushed must hold that write or a later one, and no sector may hold anything but zeros or
a sector the guest wrote (at its own place, with its exact bytes).
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass, field

BLOCK = 4096
SECTOR = 512
SECTORS = BLOCK // SECTOR
MAGIC = b"PYVFIOIT"
MASK = (1 << 64) - 1
K_GEN = 0xD1B54A32D192ED03
K_PICK = 0xABC98388FB8FAC03
K_BLOCK = 0x8CB92BA72F3D8DD7
K_SECTOR = 0x9E3779B97F4A7C15
_ZERO_SECTOR = bytes(SECTOR)
#: generations beyond the last flushed one that a sector may come from (written, not flushed)
MAX_AHEAD = 10_000


def _splitmix(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return state, z ^ (z >> 31)


def pick(seed: int, gen: int, k: int, nblocks: int) -> int:
    _, out = _splitmix(seed ^ (gen * K_GEN & MASK) ^ (k * K_PICK & MASK))
    return out % nblocks


@functools.lru_cache(maxsize=4096)
def picks(seed: int, gen: int, batch: int, nblocks: int) -> frozenset[int]:
    """The blocks generation ``gen`` writes."""
    return frozenset(pick(seed, gen, k, nblocks) for k in range(batch))


def sector(seed: int, block: int, gen: int, index: int) -> bytes:
    """The 512 bytes the guest writes to sector ``index`` of ``block`` in generation ``gen``."""
    state = seed ^ (block * K_BLOCK & MASK) ^ (gen * K_GEN & MASK) ^ (index * K_SECTOR & MASK)
    words = []
    for _ in range((SECTOR - 32) // 8):
        state, out = _splitmix(state)
        words.append(out)
    return MAGIC + struct.pack(f"<3Q{len(words)}Q", block, gen, index, *words)


def flushed_generation(console: str) -> int:
    """The last generation whose flush the guest saw return (0 if none)."""
    gens = [int(g) for g in re.findall(r"FLUSHED gen (\d+)", console)]
    return max(gens, default=0)


@dataclass
class Verdict:
    flushed: int
    #: blocks whose content a flushed write fixes, all checked byte for byte
    verified_blocks: int = 0
    #: blocks holding a write of a later, unflushed generation (allowed)
    newer_blocks: int = 0
    #: non-zero sectors checked against the write they claim to be
    sectors_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_image(image: bytes, *, seed: int, nblocks: int, batch: int,
                flushed: int) -> Verdict:
    """Judge ``image`` after a run of ``blkverify DEV seed nblocks batch PROCS 0`` of which
    generations 1..``flushed`` were seen flushed."""
    v = Verdict(flushed)
    required: dict[int, int] = {}
    for gen in range(1, flushed + 1):
        for b in picks(seed, gen, batch, nblocks):
            required[b] = gen
    end = nblocks * BLOCK
    if len(image) < end:
        v.problems.append(f"image of {len(image)} bytes is shorter than {nblocks} blocks")
        return v
    rest = memoryview(image)[end:]
    step = 1 << 20
    zeros = bytes(step)
    for pos in range(0, len(rest), step):
        chunk = rest[pos:pos + step]
        if chunk != zeros[:len(chunk)]:
            v.problems.append(f"bytes beyond the written blocks at {end + pos:#x} are not zero")
            break
    for b in range(nblocks):
        need = required.get(b)
        newer = False
        for i in range(SECTORS):
            off = b * BLOCK + i * SECTOR
            raw = image[off:off + SECTOR]
            where = f"block {b} sector {i}"
            if raw == _ZERO_SECTOR:
                if need is not None:
                    v.problems.append(f"{where}: zeros, but generation {need} wrote it and "
                                      "was flushed")
                continue
            v.sectors_checked += 1
            if raw[:8] != MAGIC:
                v.problems.append(f"{where}: bytes the guest never wrote ({raw[:16].hex()})")
                continue
            blk, gen, idx = struct.unpack_from("<3Q", raw, 8)
            if (blk, idx) != (b, i):
                v.problems.append(f"{where}: holds block {blk} sector {idx} (gen {gen})")
                continue
            if not 1 <= gen <= flushed + MAX_AHEAD or b not in picks(seed, gen, batch, nblocks):
                v.problems.append(f"{where}: generation {gen} never wrote this block")
                continue
            if raw != sector(seed, b, gen, i):
                v.problems.append(f"{where}: generation {gen}'s header with other bytes")
                continue
            if need is not None and gen < need:
                v.problems.append(f"{where}: generation {gen}, but {need} was flushed")
                continue
            newer = newer or gen > flushed
        if need is not None:
            v.verified_blocks += 1
        if newer:
            v.newer_blocks += 1
        if len(v.problems) > 20:
            v.problems.append("(more problems not listed)")
            break
    return v
