"""A vfio-user client that talks the way QEMU's ``vfio-user-pci`` does.

It is what the tests, the benchmarks and users' own device unit tests drive a server with::

    with Client.connect("/tmp/dev.sock") as c:
        c.negotiate()
        ram = c.add_memory(0, 16 << 20)           # memfd-backed "guest RAM", DMA_MAP'ed
        c.get_device_info()
        cfg = c.config_read(0, 4)
        c.region_write(0, 0x10, b"\\x01\\0\\0\\0")
        efd = c.enable_msix(vectors=1)[0]

A background thread reads the socket: replies go to the waiting caller; DMA_READ / DMA_WRITE
requests from the server are served from the client's memory, in the spec's layout (QEMU 11.1)
or the legacy one (QEMU 10.1/10.2), as chosen.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import mmap
import os
import socket
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from .client_migration import MigrationClient
from .errors import ClientError, ConnectionClosed, ErrorReply, FramingError, ProtocolError
from .protocol import codec
from .protocol.constants import (
    HEADER_SIZE,
    Command,
    DmaLayout,
    DmaMapFlag,
    IrqIndex,
    IrqSetFlag,
    RegionIndex,
)
from .protocol.session import DEFAULT_MAX_DATA_XFER, max_message_size
from .protocol.structs import (
    DeviceInfo,
    DmaAccess,
    DmaAccessLegacy,
    DmaMap,
    DmaUnmap,
    IrqInfo,
    IrqSet,
    RegionAccess,
    RegionInfo,
    WriteMulti,
    WriteMultiEntry,
)
from .transport import SocketReader, send_bytes

__all__ = ["QEMU_CAPABILITIES", "Client", "ClientError", "ErrorReply", "MemoryRegion",
           "RegionDescription"]

#: QEMU's VERSION capabilities, as 10.1 - 11.1 send them.
QEMU_CAPABILITIES: dict[str, Any] = {
    "max_msg_fds": 16,
    "max_data_xfer_size": 1048576,
    "pgsizes": 4096,
    "max_dma_maps": 65535,
    "migration": {"pgsize": 4096, "max_bitmap_size": 268435456},
    "write_multiple": True,
}


@dataclass
class MemoryRegion:
    """A piece of client memory mapped for DMA."""

    iova: int
    size: int
    fd: int | None
    mem: mmap.mmap
    prot: int
    base: int = 0  # where iova maps to inside ``mem``


@dataclass
class RegionDescription:
    index: int
    flags: int
    size: int
    offset: int
    sparse: list[tuple[int, int]] | None
    fd: int | None = None
    msix_mappable: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Client(MigrationClient):
    """A synchronous vfio-user client with a reader thread.

    Migration v2 (``migrate_to``, DEVICE_FEATURE, MIG_DATA_*) is in :class:`MigrationClient`.

    With ``serve_dma=False`` the server's DMA_READ / DMA_WRITE requests are recorded in
    :attr:`unanswered` and never answered, as when QEMU's main loop is blocked.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        dma_layout: DmaLayout = DmaLayout.SPEC,
        timeout: float = 5.0,
        serve_dma: bool = True,
    ) -> None:
        if dma_layout is DmaLayout.AUTO:
            raise ValueError("a client has a definite DMA layout: SPEC or LEGACY")
        self.sock = sock
        self.dma_layout = dma_layout
        self.timeout = timeout
        self.serve_dma = serve_dma
        self.memory: list[MemoryRegion] = []
        self.server_caps: dict[str, Any] = {}
        self.dma_requests: list[tuple[str, int, int]] = []  # (kind, addr, count) served
        #: server requests received while ``serve_dma`` is false (never answered)
        self.unanswered: list[codec.Message] = []
        #: the one reader; its size limit follows the capabilities the client announces
        self._rx = SocketReader(sock, max_message_size(DEFAULT_MAX_DATA_XFER), peer="server",
                                chunk=64 * 1024)
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[codec.Message]] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name="vfio-user-client",
                                        daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, path: str | os.PathLike[str], **kwargs: Any) -> Client:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(os.fspath(path))
        except OSError:
            sock.close()
            raise
        return cls(sock, **kwargs)

    # --- plumbing ---------------------------------------------------------------------------
    def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        """Send bytes as they are (tests of bad input); ``fds`` go with the first byte."""
        with self._send_lock:
            send_bytes(self.sock, data, fds or ())

    def _read_loop(self) -> None:
        try:
            while True:
                msg = self._rx.read_message()
                if msg.is_reply:
                    with self._lock:
                        fut = self._pending.pop(msg.msg_id, None)
                    if fut is None:
                        msg.close_fds()
                    else:
                        fut.set_result(msg)
                else:
                    self._serve(msg)
        except (ConnectionClosed, OSError, FramingError) as exc:
            with self._lock:
                self._closed = True
                pending, self._pending = self._pending, {}
            for fut in pending.values():
                fut.set_exception(ConnectionClosed(f"connection lost: {exc}"))
        finally:
            self._rx.close()

    def request(
        self,
        command: int,
        payload: bytes = b"",
        fds: list[int] | None = None,
        *,
        no_reply: bool = False,
        check: bool = True,
    ) -> codec.Message | None:
        """Send a request; wait for and return its reply (raising ErrorReply on errors)."""
        msg_id = next(self._ids) & 0xFFFF
        msg = codec.request(msg_id, command, payload, fds or [], no_reply=no_reply)
        fut: Future[codec.Message] | None = None
        if not no_reply:
            fut = Future()
            with self._lock:
                if self._closed:
                    raise ConnectionClosed("connection is closed")
                self._pending[msg_id] = fut
        self.send_raw(codec.encode(msg), msg.fds)
        if fut is None:
            return None
        try:
            reply = fut.result(self.timeout)
        except FutureTimeout:
            with self._lock:
                self._pending.pop(msg_id, None)
            raise TimeoutError(f"no reply to {codec.Message(msg_id, command).command_name()}"
                               ) from None
        if check and reply.is_error:
            reply.close_fds()
            raise ErrorReply(
                f"{reply.command_name()} failed: {os.strerror(reply.error)}", errno=reply.error
            )
        return reply

    def _call(self, command: Command, payload: bytes = b"", fds: list[int] | None = None
              ) -> codec.Message:
        reply = self.request(command, payload, fds)
        assert reply is not None
        return reply

    # --- serving the server's DMA requests --------------------------------------------------
    def _find(self, addr: int, count: int) -> tuple[MemoryRegion, int]:
        for reg in self.memory:
            if reg.iova <= addr and addr + count <= reg.iova + reg.size:
                return reg, reg.base + addr - reg.iova
        raise LookupError

    def _serve(self, msg: codec.Message) -> None:
        msg.close_fds()
        if not self.serve_dma:
            # like a QEMU whose main loop is blocked: the request is never answered
            self.unanswered.append(msg)
            return
        err = 0
        payload = b""
        try:
            if msg.command not in (Command.DMA_READ, Command.DMA_WRITE):
                err = errno.ENOSYS
            elif self.dma_layout is DmaLayout.SPEC:
                acc = DmaAccess.unpack(msg.payload)
                data = msg.payload[DmaAccess.SIZE:]
                payload = self._do_dma(msg.command, acc.addr, acc.count, data)
                if msg.command == Command.DMA_READ:
                    payload = DmaAccess(acc.addr, acc.count).pack() + payload
                else:
                    payload = DmaAccess(acc.addr, acc.count).pack()
            else:
                leg = DmaAccessLegacy.unpack(msg.payload)
                data = msg.payload[DmaAccessLegacy.SIZE:][: leg.count]
                payload = self._do_dma(msg.command, leg.addr, leg.count, data)
                if msg.command == Command.DMA_READ:
                    payload = DmaAccessLegacy(leg.addr, leg.count).pack() + payload + bytes(4)
                else:
                    payload = b""
        except (LookupError, ProtocolError, ValueError):
            err = errno.EFAULT
        if msg.no_reply and not err:
            return
        reply = (codec.error_reply(msg, err) if err else codec.reply_to(msg, payload))
        with contextlib.suppress(OSError):
            self.send_raw(codec.encode(reply))

    def _do_dma(self, command: int, addr: int, count: int, data: bytes) -> bytes:
        if count > 1 << 26:
            raise ValueError("count too large")
        if count == 0:
            return b""
        reg, off = self._find(addr, count)
        if command == Command.DMA_READ:
            self.dma_requests.append(("read", addr, count))
            return bytes(reg.mem[off:off + count])
        if len(data) < count:
            raise ValueError("short DMA_WRITE")
        if not reg.prot & DmaMapFlag.WRITE:
            raise ValueError("read-only memory")
        self.dma_requests.append(("write", addr, count))
        reg.mem[off:off + count] = data[:count]
        return b""

    # --- protocol commands ------------------------------------------------------------------
    def negotiate(self, capabilities: dict[str, Any] | None = None) -> dict[str, Any]:
        caps = QEMU_CAPABILITIES if capabilities is None else capabilities
        xfer = caps.get("max_data_xfer_size", DEFAULT_MAX_DATA_XFER)
        if isinstance(xfer, int) and xfer > DEFAULT_MAX_DATA_XFER:
            # the reader takes what this client announces, never less than the spec's default
            self._rx.reader.max_size = max_message_size(xfer)
        reply = self._call(Command.VERSION, codec.encode_version(0, 0, caps))
        major, minor, server_caps = codec.decode_version(reply.payload)
        if (major, minor) != (0, 0):
            raise ProtocolError(f"server answered version {major}.{minor}")
        if len(reply.payload) + HEADER_SIZE > 214:
            raise ProtocolError("VERSION reply larger than QEMU's 214-byte buffer")
        self.server_caps = server_caps
        return server_caps

    def add_memory(self, iova: int, size: int, *, fd_backed: bool = True,
                   writable: bool = True, file_offset: int = 0,
                   sealed: bool = False) -> MemoryRegion:
        """Create memory (a memfd, or anonymous when ``fd_backed`` is false) and DMA_MAP it.

        ``sealed``: seal the memfd against shrinking and growing, as QEMU's
        ``memory-backend-memfd`` does by default (the server then uses it zero-copy)."""
        prot = DmaMapFlag.READ | (DmaMapFlag.WRITE if writable else 0)
        if fd_backed:
            flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealed else 0)
            fd = os.memfd_create("vfio-user-client-ram", flags)
            os.ftruncate(fd, file_offset + size)
            if sealed:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            mem = mmap.mmap(fd, file_offset + size)
            region = MemoryRegion(iova, size, fd, mem, int(prot), file_offset)
            self.dma_map(iova, size, int(prot), fd=fd, offset=file_offset)
        else:
            mem = mmap.mmap(-1, size)
            region = MemoryRegion(iova, size, None, mem, int(prot))
            self.dma_map(iova, size, int(prot))
        self.memory.append(region)
        return region

    def dma_map(self, iova: int, size: int, prot: int = 3, *, fd: int | None = None,
                offset: int = 0) -> None:
        self._call(Command.DMA_MAP, DmaMap(DmaMap.SIZE, prot, offset, iova, size).pack(),
                   [fd] if fd is not None else None)

    def dma_unmap(self, iova: int, size: int, flags: int = 0) -> None:
        self._call(Command.DMA_UNMAP, DmaUnmap(DmaUnmap.SIZE, flags, iova, size).pack())
        for reg in list(self.memory):
            if reg.iova == iova and reg.size == size:
                self.memory.remove(reg)
                reg.mem.close()
                if reg.fd is not None:
                    os.close(reg.fd)

    def get_device_info(self) -> DeviceInfo:
        reply = self._call(Command.DEVICE_GET_INFO, DeviceInfo(DeviceInfo.SIZE, 0, 0, 0).pack())
        if len(reply.payload) != DeviceInfo.SIZE:
            raise ProtocolError("GET_INFO reply is not 16 bytes")
        return DeviceInfo.unpack(reply.payload)

    def get_region_info(self, index: int, argsz: int = RegionInfo.SIZE) -> RegionDescription:
        """GET_REGION_INFO with QEMU's retry: ask with 32 bytes, again if more is needed."""
        reply = self._call(Command.DEVICE_GET_REGION_INFO,
                           RegionInfo(argsz, 0, index, 0, 0, 0).pack())
        info = RegionInfo.unpack(reply.payload)
        if len(reply.payload) > argsz:
            reply.close_fds()
            raise ProtocolError(f"REGION_INFO reply of {len(reply.payload)} > argsz {argsz}")
        if info.argsz > argsz:
            reply.close_fds()
            return self.get_region_info(index, info.argsz)
        info, sparse, mappable = codec.decode_region_info(reply.payload)
        if len(reply.fds) > 1:
            reply.close_fds()
            raise ProtocolError("REGION_INFO reply with more than one fd")
        fd = reply.fds[0] if reply.fds else None
        return RegionDescription(index, info.flags, info.size, info.offset, sparse, fd, mappable)

    def get_irq_info(self, index: int) -> IrqInfo:
        reply = self._call(Command.DEVICE_GET_IRQ_INFO, IrqInfo(IrqInfo.SIZE, 0, index, 0).pack())
        return IrqInfo.unpack(reply.payload)

    def set_irqs(self, index: int, flags: int, start: int = 0, count: int = 0,
                 fds: list[int] | None = None, data: bytes = b"") -> None:
        argsz = IrqSet.SIZE + len(data)
        self._call(Command.DEVICE_SET_IRQS,
                   IrqSet(argsz, flags, index, start, count).pack() + data, fds)

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        reply = self._call(Command.REGION_READ, RegionAccess(offset, region, count).pack())
        acc = RegionAccess.unpack(reply.payload)
        data = reply.payload[RegionAccess.SIZE:]
        if acc.count != len(data):
            raise ProtocolError("REGION_READ reply count does not match its data")
        return data

    def region_write(self, region: int, offset: int, data: bytes, *, posted: bool = False
                     ) -> None:
        self.request(Command.REGION_WRITE,
                     RegionAccess(offset, region, len(data)).pack() + data, no_reply=posted)

    def write_multi(self, writes: list[tuple[int, int, bytes]], *, posted: bool = True) -> None:
        body = b"".join(
            WriteMultiEntry(off, reg, len(d), d.ljust(8, b"\0")).pack() for reg, off, d in writes
        )
        self.request(Command.REGION_WRITE_MULTI, WriteMulti(len(writes)).pack() + body,
                     no_reply=posted)

    def reset(self) -> None:
        reply = self._call(Command.DEVICE_RESET)
        if reply.payload:
            raise ProtocolError("DEVICE_RESET reply must be header-only")

    # --- conveniences -----------------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.region_read(RegionIndex.CONFIG, offset, size), "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.region_write(RegionIndex.CONFIG, offset, value.to_bytes(size, "little"))

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        return int.from_bytes(self.region_read(bar, offset, size), "little")

    def bar_write(self, bar: int, offset: int, size: int, value: int, *, posted: bool = False
                  ) -> None:
        self.region_write(bar, offset, value.to_bytes(size, "little"), posted=posted)

    def _eventfds(self, n: int) -> list[int]:
        return [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]

    def enable_irq(self, index: int, vectors: int) -> list[int]:
        """Give the server ``vectors`` trigger eventfds for ``index``; return the client's.

        Like QEMU, the fds go in chunks of the server's ``max_msg_fds``.
        """
        fds = self._eventfds(vectors)
        chunk = int(self.server_caps.get("max_msg_fds", 8)) or 1
        flags = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER
        for start in range(0, vectors, chunk):
            part = fds[start:start + chunk]
            self.set_irqs(index, flags, start, len(part), part)
        return fds

    def enable_msix(self, vectors: int) -> list[int]:
        return self.enable_irq(IrqIndex.MSIX, vectors)

    def disable_irq(self, index: int) -> None:
        self.set_irqs(index, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, 0, 0)

    @staticmethod
    def eventfd_count(fd: int) -> int:
        """Read and clear an eventfd counter (0 if nothing fired)."""
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0

    def read_memory(self, iova: int, count: int) -> bytes:
        reg, off = self._find(iova, count)
        return bytes(reg.mem[off:off + count])

    def write_memory(self, iova: int, data: bytes) -> None:
        reg, off = self._find(iova, len(data))
        reg.mem[off:off + len(data)] = data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(5)
        for reg in self.memory:
            reg.mem.close()
            if reg.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(reg.fd)
        self.memory.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

