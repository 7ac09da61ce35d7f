"""The integrity checker of the NVMe fault tests (tests/blkverify.py) and the guest program it
mirrors (``blkverify``, run here on the host against a plain file): an image the program wrote
passes, and every kind of damage the fault tests look for is caught."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from blkverify import BLOCK, SECTOR, check_image, flushed_generation, picks, sector

from vfio_user_server.testing.guestprog import guest_program

SEED, NBLOCKS, BATCH, PROCS = 0x5EED_1234_ABCD, 64, 24, 3


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int]:
    """An image written by 4 generations of ``blkverify`` (plus zeros after its blocks)."""
    image = tmp_path_factory.mktemp("blkverify") / "disk.img"
    with open(image, "wb") as f:
        f.truncate(NBLOCKS * BLOCK + (1 << 20))
    out = subprocess.run([str(guest_program("blkverify")), str(image), hex(SEED),
                          str(NBLOCKS), str(BATCH), str(PROCS), "4"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[0] == "START"
    assert out.stdout.splitlines()[-1] == "DONE"
    return Path(image).read_bytes(), flushed_generation(out.stdout)


def blocks_written(gens: int) -> set[int]:
    return set().union(*(picks(SEED, g, BATCH, NBLOCKS) for g in range(1, gens + 1)))


def test_the_program_writes_what_the_checker_expects(written: tuple[bytes, int]) -> None:
    data, flushed = written
    assert flushed == 4
    v = check_image(data, seed=SEED, nblocks=NBLOCKS, batch=BATCH, flushed=flushed)
    assert v.ok, v.problems
    assert v.verified_blocks == len(blocks_written(4))
    assert v.sectors_checked == 8 * v.verified_blocks
    # fewer generations seen flushed: the later ones are allowed, not required
    v = check_image(data, seed=SEED, nblocks=NBLOCKS, batch=BATCH, flushed=2)
    assert v.ok, v.problems
    assert v.verified_blocks == len(blocks_written(2))
    later = picks(SEED, 3, BATCH, NBLOCKS) | picks(SEED, 4, BATCH, NBLOCKS)
    assert v.newer_blocks == len(later)

def damaged(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


def one_problem(data: bytes, flushed: int = 4) -> str:
    v = check_image(data, seed=SEED, nblocks=NBLOCKS, batch=BATCH, flushed=flushed)
    assert len(v.problems) == 1, v.problems
    return v.problems[0]


def test_every_kind_of_damage_is_caught(written: tuple[bytes, int]) -> None:
    data, _ = written
    done = sorted(blocks_written(4))
    untouched = sorted(set(range(NBLOCKS)) - blocks_written(4))
    b = done[0]
    last = max(g for g in range(1, 5) if b in picks(SEED, g, BATCH, NBLOCKS))
    # a flushed write lost (the sector back to zeros)
    assert "zeros, but generation" in one_problem(damaged(data, b * BLOCK, bytes(SECTOR)))
    # a flushed write replaced by an older one of the same block
    older = [g for g in range(1, last) if b in picks(SEED, g, BATCH, NBLOCKS)]
    if older:
        stale = sector(SEED, b, older[-1], 0)
        assert f"but {last} was flushed" in one_problem(damaged(data, b * BLOCK, stale))
    # the write of a generation that never wrote the block
    never = next(g for g in range(5, 500) if b not in picks(SEED, g, BATCH, NBLOCKS))
    assert "never wrote this block" in one_problem(
        damaged(data, b * BLOCK, sector(SEED, b, never, 0)))
    # a sector at the wrong place
    assert "holds block" in one_problem(damaged(data, b * BLOCK + SECTOR, data[b * BLOCK:
                                                                              b * BLOCK + SECTOR]))
    # a payload byte changed
    pos = b * BLOCK + 100
    assert "other bytes" in one_problem(damaged(data, pos, bytes([data[pos] ^ 1])))
    # bytes the guest never wrote, in a block it never touched and beyond the written blocks
    if untouched:
        assert "never wrote" in one_problem(damaged(data, untouched[0] * BLOCK, b"junk"))
    assert "beyond the written blocks" in one_problem(damaged(data, NBLOCKS * BLOCK + 7, b"x"))
    # an image from which the last two flushed generations are missing
    v = check_image(bytes(len(data)), seed=SEED, nblocks=NBLOCKS, batch=BATCH, flushed=1)
    assert len(v.problems) == 8 * len(blocks_written(1)) or len(v.problems) > 20


def test_flushed_generation_reads_the_console() -> None:
    assert flushed_generation("") == 0
    assert flushed_generation("START\nFLUSHED gen 1\r\nnoise FLUSHED gen 12\nERROR x\n") == 12


def test_a_program_outside_the_package_builds_static_and_cached(tmp_path: Path) -> None:
    """``guest_program(name, source=...)``: a benchmark's own tool, built and cached alike."""
    from vfio_user_server.testing.guestprog import guest_program, is_static_elf

    src = tmp_path / "hello.c"
    src.write_text("int main(void) { return 0; }\n")
    first = guest_program("hello", source=src, cache=tmp_path / "cache")
    assert first.name == "hello" and is_static_elf(first.read_bytes())
    assert guest_program("hello", source=src, cache=tmp_path / "cache") == first  # cached
    src.write_text("int main(void) { return 1; }\n")
    assert guest_program("hello", source=src, cache=tmp_path / "cache") != first  # rebuilt
