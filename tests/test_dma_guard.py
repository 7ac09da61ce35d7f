"""A client that shrinks or hole-punches its guest memory after DMA_MAP cannot crash the server.

Each kind of file QEMU maps (a sealed memfd, an unsealed memfd, a regular file, a file on tmpfs)
is shrunk and hole-punched after the map, then the device DMAs into it: a DMA error for the
pages that are gone, the rest works, and the server keeps serving. Every test runs with the C
shim's guarded memcpy and with the pure-Python copier (both must work: the shim is built by
``pip install``, so a missing shim fails here instead of skipping).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import WAIT, ClientFactory, ServerFactory, device_dma, negotiated

from vfio_user_server import dmacopy
from vfio_user_server.dma import DmaAccessor, DmaMapTable, DmaProt
from vfio_user_server.dmacopy import GuardedCopy
from vfio_user_server.errors import DmaError
from vfio_user_server.sample import DMA_FROM_DEVICE, DMA_TO_DEVICE, STAT_DONE, STAT_ERROR

PAGE = 0x1000
SIZE = 4 * PAGE
RW = DmaProt.READ | DmaProt.WRITE
_FALLOC_FL_KEEP_SIZE = 0x1
_FALLOC_FL_PUNCH_HOLE = 0x2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch_hole(fd: int, offset: int, length: int) -> None:
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass
class GuestFile:
    kind: str
    fd: int

    @property
    def sealed(self) -> bool:
        return self.kind == "sealed-memfd"


def _sealed_memfd(_: Path) -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, SIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def _memfd(_: Path) -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    return fd


def _regular_file(tmp_path: Path) -> int:
    fd = os.open(tmp_path / "guest-ram", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, SIZE)
    return fd


def _tmpfs_file(_: Path) -> int:
    fd, name = tempfile.mkstemp(prefix="pyvfio-guest-ram-", dir="/dev/shm")
    os.unlink(name)
    os.ftruncate(fd, SIZE)
    return fd


KINDS: dict[str, Callable[[Path], int]] = {
    "sealed-memfd": _sealed_memfd,
    "memfd": _memfd,
    "regular-file": _regular_file,
    "tmpfs-file": _tmpfs_file,
}


@pytest.fixture(params=list(KINDS))
def guest_file(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GuestFile]:
    fd = KINDS[request.param](tmp_path)
    os.pwrite(fd, bytes(range(256)) * (SIZE // 256), 0)
    yield GuestFile(request.param, fd)
    os.close(fd)


@pytest.fixture(params=["c-shim", "python"])
def copier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[GuardedCopy]:
    """The guarded copy under test, also made the process default (for servers)."""
    if request.param == "c-shim":
        module = dmacopy._load_shim()
        assert module is not None, "the C shim is not built (pip install needs gcc, Python.h)"
        shim = dmacopy.ShimCopy(module)
        monkeypatch.setattr(dmacopy, "_default", shim)
        yield shim
        return
    python = dmacopy.PythonCopy()
    monkeypatch.setattr(dmacopy, "_default", python)
    yield python
    python.close()


def shrink(f: GuestFile, size: int) -> bool:
    """Shrink the file; False if its seals refuse (as they must for the sealed memfd)."""
    try:
        os.ftruncate(f.fd, size)
    except PermissionError:
        assert f.sealed
        return False
    assert not f.sealed
    return True


# --- the map table and the accessor -----------------------------------------------------------


def test_zero_copy_only_for_sealed_files(guest_file: GuestFile, copier: GuardedCopy) -> None:
    table = DmaMapTable()
    table.add(0, SIZE, RW, os.dup(guest_file.fd), 0)
    [m] = table.maps()
    assert m.direct
    assert m.zero_copy == guest_file.sealed
    assert table.is_zero_copy(0, SIZE) == guest_file.sealed
    segs = table.translate(0, PAGE, write=True)
    assert (segs[0].view is not None) == guest_file.sealed
    table.release(segs)
    acc = DmaAccessor(table)  # no message DMA: every access is direct
    assert acc.read(0x10, 4) == bytes(range(0x10, 0x14))
    acc.write(PAGE - 2, b"edge")  # straddles two pages
    assert os.pread(guest_file.fd, 4, PAGE - 2) == b"edge"
    with acc.map(PAGE, 8, write=True) as views:
        views[0][:4] = b"mapd"
    assert os.pread(guest_file.fd, 4, PAGE) == b"mapd"
    table.remove_all()


def test_shrunk_file_is_a_dma_error(guest_file: GuestFile, copier: GuardedCopy) -> None:
    table = DmaMapTable()
    table.add(0x100000, SIZE, RW, os.dup(guest_file.fd), 0)
    acc = DmaAccessor(table)
    shrunk = shrink(guest_file, PAGE)
    # the page that stays works either way
    acc.write(0x100000, b"kept")
    assert acc.read(0x100000, 4) == b"kept"
    for iova, n in ((0x100000 + 2 * PAGE, 16), (0x100000 + PAGE - 8, 16), (0x100000, SIZE)):
        if not shrunk:  # sealed: the shrink was refused, all memory is still there
            acc.write(iova, bytes(n))
            assert acc.read(iova, n) == bytes(n)
            continue
        with pytest.raises(DmaError) as e:
            acc.read(iova, n)
        assert e.value.errno == errno.EFAULT
        with pytest.raises(DmaError) as e:
            acc.write(iova, b"x" * n)
        assert e.value.errno == errno.EFAULT
        with pytest.raises(DmaError) as e, acc.map(iova, n):
            pass
        assert e.value.errno == errno.EFAULT
    if shrunk:
        assert os.fstat(guest_file.fd).st_size == PAGE, "a DMA write never grows the file"
    # the client grows it back: the same map works again
    os.ftruncate(guest_file.fd, SIZE)
    acc.write(0x100000 + 3 * PAGE, b"back")
    assert acc.read(0x100000 + 3 * PAGE, 4) == b"back"
    table.remove_all()
    assert table.mapped_file_count() == 0


def test_punched_hole_reads_zeros(guest_file: GuestFile, copier: GuardedCopy) -> None:
    table = DmaMapTable()
    table.add(0, SIZE, RW, os.dup(guest_file.fd), 0)
    acc = DmaAccessor(table)
    punch_hole(guest_file.fd, PAGE, 2 * PAGE)
    assert acc.read(PAGE - 4, 8) == bytes(range(0xFC, 0x100)) + bytes(4)
    acc.write(PAGE + 4, b"fill")
    assert os.pread(guest_file.fd, 8, PAGE) == bytes(4) + b"fill"
    table.remove_all()


def test_shrink_during_a_long_copy(copier: GuardedCopy) -> None:
    """The copy is in flight (inside the guard) while the file goes away under it."""
    fd = _memfd(Path())
    big = 64 * PAGE
    os.ftruncate(fd, big)
    table = DmaMapTable()
    table.add(0, big, RW, os.dup(fd), 0)
    acc = DmaAccessor(table)
    os.ftruncate(fd, big // 2)
    with pytest.raises(DmaError):
        acc.read(0, big)
    with pytest.raises(DmaError):
        acc.write(0, bytes(big))
    assert acc.read(0, 16) == bytes(16)
    os.close(fd)
    table.remove_all()


def test_default_copy_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dmacopy, "_default", None)
    monkeypatch.setenv(dmacopy.ENV_NO_SHIM, "1")
    assert dmacopy.default_copy().name == "python"
    monkeypatch.setattr(dmacopy, "_default", None)
    monkeypatch.delenv(dmacopy.ENV_NO_SHIM)
    assert dmacopy.shim_available(), "the C shim is not built (pip install needs gcc, Python.h)"
    assert dmacopy.default_copy().name == "c-shim"
    assert DmaMapTable().copy_name == "c-shim"


def test_faults_outside_a_copy_are_not_swallowed(copier: GuardedCopy, tmp_path: Path) -> None:
    """The shim's handler only catches faults in its own copies: any other SIGBUS still kills."""
    import subprocess
    import sys

    script = f"""
import mmap, os
from vfio_user_server import dmacopy
c = dmacopy.{'ShimCopy(dmacopy._load_shim())' if copier.name == 'c-shim' else 'PythonCopy()'}
fd = os.memfd_create("x")
os.ftruncate(fd, 8192)
m = mmap.mmap(fd, 8192)
os.ftruncate(fd, 0)
try:
    c.read(dmacopy.buffer_address(m), memoryview(bytearray(8)))
except Exception as e:
    print("guarded:", type(e).__name__, flush=True)
m[0]  # an unguarded touch: must still be a SIGBUS
print("survived", flush=True)
"""
    env = dict(os.environ)
    env.pop(dmacopy.ENV_NO_SHIM, None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env=env, cwd=tmp_path)
    assert proc.stdout == "guarded: DmaError\n", proc.stderr
    assert proc.returncode == -7, proc.stderr  # SIGBUS


# --- through a server: the device's DMA fails, the server keeps serving -----------------------


def test_device_dma_into_a_shrunk_file(
    guest_file: GuestFile,
    copier: GuardedCopy,
    make_server: ServerFactory,
    make_client: ClientFactory,
) -> None:
    server = make_server()
    client = negotiated(make_client(server))
    client.dma_map(0x200000, SIZE, RW, fd=guest_file.fd)
    conn = server.wait_for_client(WAIT)
    assert conn.table.copy_name == copier.name
    assert device_dma(client, 0x200000 + 2 * PAGE, 64, DMA_TO_DEVICE) == STAT_DONE
    shrunk = shrink(guest_file, PAGE)
    gone = STAT_ERROR if shrunk else STAT_DONE
    for _ in range(3):  # again and again: the server keeps serving
        assert device_dma(client, 0x200000 + 2 * PAGE, 64, DMA_TO_DEVICE) == gone
        assert device_dma(client, 0x200000 + 2 * PAGE, 64, DMA_FROM_DEVICE) == gone
        assert device_dma(client, 0x200000 + PAGE - 32, 64, DMA_FROM_DEVICE) == gone
        assert device_dma(client, 0x200000, 64, DMA_FROM_DEVICE) == STAT_DONE
    punch_hole(guest_file.fd, 0, PAGE)
    assert device_dma(client, 0x200000, 64, DMA_TO_DEVICE) == STAT_DONE
    client.dma_unmap(0x200000, SIZE)
    assert conn.table.maps() == []
    assert conn.table.mapped_file_count() == 0
    assert server.connection is conn, "still the same client, still served"


# --- copies whose buffer is skewed against the guest address (c_shim/dma_copy.c copy_bytes) ---

_SKEW_SIZES = (1, 2047, 2048, 2049, 4096, 4096 + 17, 128 << 10, (1 << 20) - 1, 1 << 20)


def _page_buffer(n: int) -> tuple[ctypes.Array[ctypes.c_char], int]:
    """A ctypes buffer with a page-aligned address inside (and that address)."""
    raw = ctypes.create_string_buffer(n + 2 * PAGE)
    base = (ctypes.addressof(raw) + PAGE - 1) & ~(PAGE - 1)
    return raw, base - ctypes.addressof(raw)


@pytest.mark.parametrize("sealed", [False, True], ids=["guarded", "zero-copy"])
def test_skewed_copies_are_exact(copier: GuardedCopy, sealed: bool) -> None:
    """Buffers a few bytes past the guest address modulo 4 KiB take the chunked copy (below
    1 MiB, above 2 KiB); every byte still lands where it belongs, in both directions."""
    region = 2 << 20
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, region)
    pattern = os.urandom(region)
    os.pwrite(fd, pattern, 0)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    table = DmaMapTable()
    table.add(0, region, RW, fd, 0)
    acc = DmaAccessor(table)
    raw, start = _page_buffer(region)
    try:
        for skew in (1, 16, 63, 64, PAGE - 16):
            with memoryview(raw).cast("B") as whole:
                for n in _SKEW_SIZES:
                    iova = 0x40  # guest page offset 0x40; buffer offset 0x40 + skew
                    buf = whole[start + 0x40 + skew: start + 0x40 + skew + n]
                    guard = bytes(whole[start + 0x40 + skew + n: start + 0x40 + skew + n + 8])
                    acc.read_into(iova, buf)
                    assert bytes(buf) == pattern[iova:iova + n], (skew, n)
                    assert bytes(whole[start + 0x40 + skew + n:][:8]) == guard
                    new = os.urandom(n)
                    buf[:] = new
                    acc.write(iova, buf)
                    assert os.pread(fd, n, iova) == new, (skew, n)
                    assert os.pread(fd, 8, iova + n) == pattern[iova + n:iova + n + 8]
                    os.pwrite(fd, pattern[iova:iova + n], iova)
                    buf.release()
    finally:
        table.remove_all()


def test_skewed_copy_of_a_shrunk_file_is_a_dma_error(copier: GuardedCopy) -> None:
    """The chunked copy runs inside the guard too."""
    region = 256 << 10
    fd = _memfd(Path())
    os.ftruncate(fd, region)
    table = DmaMapTable()
    table.add(0, region, RW, os.dup(fd), 0)
    acc = DmaAccessor(table)
    raw, start = _page_buffer(region)
    os.ftruncate(fd, region // 2)
    with memoryview(raw).cast("B") as whole, whole[start + 16: start + 16 + region - PAGE] as buf:
        with pytest.raises(DmaError) as e:
            acc.read_into(0, buf)
        assert e.value.errno == errno.EFAULT
        with pytest.raises(DmaError):
            acc.write(0, buf)
    assert acc.read(0, 16) == bytes(16)
    os.close(fd)
    table.remove_all()
