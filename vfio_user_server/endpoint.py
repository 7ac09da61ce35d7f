"""The server side of a vfio-user connection, without the socket.

:class:`Endpoint` takes decoded :class:`~vfio_user_server.protocol.Message` values, checks them
against the session state table and the command table, calls the device, and returns the reply
(or ``None`` for NO_REPLY). The transport (:mod:`vfio_user_server.server`) only moves bytes and
fds; tests can drive an Endpoint directly.

:class:`VfioDevice` is what the endpoint needs from a device: its regions, its interrupt
controller, reset, and connection hooks. :class:`vfio_user_server.device.PciDevice` implements
it for declarative PCI devices.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import migration
from .errors import EncodeError, ProtocolError, VfioUserError
from .protocol import codec
from .protocol.constants import (
    PCI_NUM_IRQS,
    PCI_NUM_REGIONS,
    Command,
    DeviceInfoFlag,
    DmaMapFlag,
    DmaUnmapFlag,
    RegionIndex,
    RegionInfoFlag,
)
from .protocol.session import Session
from .protocol.structs import (
    COMMANDS,
    DeviceInfo,
    DmaMap,
    DmaUnmap,
    IrqInfo,
    IrqSet,
    RegionAccess,
    RegionInfo,
    RegionIoFds,
    Tail,
    WriteMulti,
    WriteMultiEntry,
)

if TYPE_CHECKING:
    from .dma import DmaAccessor, DmaMapTable
    from .irq import IrqController

log = logging.getLogger(__name__)


@dataclass
class MmapSpec:
    """A region the client may mmap: an fd, the region's offset in it, and sparse areas.

    ``areas`` lists (offset, size) pieces of the region that are mappable; ``None`` means the
    whole region. Offsets must be page-aligned.
    """

    fd: int
    offset: int = 0
    areas: list[tuple[int, int]] | None = None


@dataclass
class Region:
    """One vfio region as the client sees it, with the device's access callbacks."""

    size: int
    read: Callable[[int, int], bytes] | None = None
    write: Callable[[int, bytes], None] | None = None
    mmap: MmapSpec | None = None
    msix_mappable: bool = False
    #: the ROM may answer a read short of its size (QEMU loops on short ROM reads)
    allow_short_read: bool = False
    #: Optional: ``read`` and ``write`` of 1, 2, 4 or 8 bytes with the value as an integer
    #: (little-endian; a read gives ``0 <= value < 2 ** (8 * size)``), for the C shim's loop,
    #: which then calls the device with no bytes on the way. They answer exactly as ``read``
    #: and ``write`` do; whoever replaces those drops these (a mapped BAR).
    read_value: Callable[[int, int], int] | None = None
    write_value: Callable[[int, int, int], None] | None = None

    @property
    def flags(self) -> int:
        flags = 0
        if self.read is not None:
            flags |= RegionInfoFlag.READ
        if self.write is not None:
            flags |= RegionInfoFlag.WRITE
        if self.mmap is not None:
            flags |= RegionInfoFlag.MMAP
        return int(flags)


class DeviceContext:
    """What a device gets from the connection that serves it.

    ``dma`` reads and writes guest memory; ``defer`` runs work on the device's worker thread,
    where message-based DMA is allowed (it is not on the server's loop thread: see
    docs/ARCHITECTURE.md, "The connection and its threads").
    """

    def __init__(
        self,
        dma: DmaAccessor,
        table: DmaMapTable,
        defer: Callable[[Callable[[], Any]], Future[Any]],
        loop_thread: threading.Thread | None,
    ) -> None:
        self.dma = dma
        self.table = table
        self._defer = defer
        self.loop_thread = loop_thread

    def defer(self, fn: Callable[[], Any]) -> Future[Any]:
        return self._defer(fn)

    def in_loop_thread(self) -> bool:
        return self.loop_thread is not None and threading.current_thread() is self.loop_thread


class VfioDevice(ABC):
    """The interface between a device model and the protocol endpoint.

    The server and the endpoint call the ``vfio_*`` methods, and only they do: each is the
    server's side of one event (a client attached, detached, or asked for DEVICE_RESET).
    :class:`~vfio_user_server.device.PciDevice` implements them once (they are final there)
    and calls its author's hooks from them: ``on_connect``, ``on_disconnect`` and ``reset``.
    """

    irqs: IrqController

    @abstractmethod
    def regions(self) -> Mapping[int, Region]:
        """Regions by index (0-5 BARs, 6 ROM, 7 config); missing indices have size 0."""

    def supports_reset(self) -> bool:
        return True

    def supports_migration(self) -> bool:
        """Whether the device's state can move to another server (migration v2): the device
        then has ``save_state()``, ``load_state(data)`` and ``quiesced()`` (PciDevice: when it
        declares state fields). The server advertises it in VERSION."""
        return False

    @abstractmethod
    def vfio_reset(self) -> None:
        """DEVICE_RESET from the client (a whole-device reset); interrupts are reset already."""

    def vfio_attach(self, ctx: DeviceContext) -> None:  # noqa: B027 (optional)
        """A client finished VERSION; ``ctx`` gives DMA and the worker."""

    def vfio_detach(self) -> None:  # noqa: B027 (optional)
        """The client went away; its DMA maps and interrupt fds are already gone."""


# --- The endpoint --------------------------------------------------------------------------

#: A handler returns the reply payload, or the payload and fds to send with it.
HandlerResult = bytes | tuple[bytes, list[int]] | None
Handler = Callable[["Endpoint", codec.Message], HandlerResult]


class Endpoint:
    """Handle client requests for one device over one connection, in arrival order."""

    def __init__(self, device: VfioDevice, session: Session, table: DmaMapTable) -> None:
        self.device = device
        self.session = session
        self.table = table
        self._regions = device.regions()
        self.migration = migration.Migration(device, session)
        #: most fds a request may carry: the command table's, within what the server advertises
        limit = session.caps.max_msg_fds
        self._max_fds: dict[int, int] = {
            int(cmd): limit if spec.max_request_fds is None else min(spec.max_request_fds, limit)
            for cmd, spec in COMMANDS.items()
        }

    # Returns the reply to send, or None (NO_REPLY honoured). Never raises for bad input.
    def handle(self, msg: codec.Message) -> codec.Message | None:
        cmd = msg.command
        try:
            if msg.is_reply:
                raise ProtocolError("a reply where a request was expected")
            if not self.session.accepts(cmd):
                self.session.check(cmd)  # raises the precise error
            _check_layout(msg)
            if cmd in self.migration.gated:
                self.migration.check_access(msg)
            if msg.fds and len(msg.fds) > self._max_fds[cmd]:
                raise ProtocolError(
                    f"{msg.command_name()} takes at most {self._max_fds[cmd]} fds, got "
                    f"{len(msg.fds)}",
                    errno=errno.EINVAL,
                )
            result = _HANDLERS[cmd](self, msg)
            self.session.completed(cmd)
        except Exception as exc:  # a bug in a device handler must not kill the server
            return self.failed(msg, exc)
        if msg.fds:  # a handler that keeps fds takes them out of msg.fds
            msg.close_fds()
        if msg.no_reply:
            return None
        if isinstance(result, tuple):
            reply = codec.reply_to(msg, result[0])
            reply.fds = result[1]
            return reply
        return codec.reply_to(msg, result or b"")

    def failed(self, msg: codec.Message, exc: Exception) -> codec.Message | None:
        """The answer to ``msg`` whose handling raised ``exc``: an error reply (None for
        NO_REPLY), logged; its fds are closed. Called from the ``except`` block (a bug gets
        its traceback logged). The C shim's fast path answers its handlers' errors here too."""
        msg.close_fds()
        if isinstance(exc, EncodeError):  # our own bug, not the client's: EIO, traceback
            log.exception("%s #%d: reply not encodable", msg.command_name(), msg.msg_id)
            code = exc.errno
        elif isinstance(exc, VfioUserError):
            log.warning("%s #%d failed: %s", msg.command_name(), msg.msg_id, exc)
            code = exc.errno
        else:
            log.exception("%s #%d: device error", msg.command_name(), msg.msg_id)
            code = _errno_of(exc)
        if msg.no_reply:
            return None
        return codec.error_reply(msg, code)

    def ungated(self, command: int) -> bool:
        """Whether the session state and the migration state let ``command`` through as
        things stand (the C shim's fast path takes only such commands; both states change
        only through the messages it hands to :meth:`handle`)."""
        return self.session.accepts(command) and command not in self.migration.gated

    def plain_set_irqs(self, payload: bytes) -> tuple[int, int, int, int]:
        """A DEVICE_SET_IRQS request without fds or data (``payload`` is the structure alone),
        checked by every rule the Python path applies to it but the session and migration
        states' (:meth:`ungated` says those as things stand): the command table's (size,
        argsz) and the IRQ controller's validation. Returns its ``(index, flags, start,
        count)`` for :meth:`IrqController.set_irqs <vfio_user_server.irq.IrqController.
        set_irqs>`, which is what :func:`_set_irqs` calls with it; raises what the Python path
        would answer with. The C shim's loop takes such a request byte for byte
        (:meth:`vfio_user_server.msgshim.FastPath.allow_set_irqs`)."""
        if len(payload) != IrqSet.SIZE:
            raise ValueError(f"a plain SET_IRQS is {IrqSet.SIZE} bytes, not {len(payload)}")
        _check_layout(codec.request(0, Command.DEVICE_SET_IRQS, payload))
        req = IrqSet.unpack(payload)
        self.device.irqs.check_plain(req.index, req.flags, req.start, req.count)
        return req.index, req.flags, req.start, req.count

    @staticmethod
    def short_read(index: int, got: int, count: int) -> VfioUserError:
        """A region's read handler returned ``got`` bytes where ``count`` were asked for."""
        return VfioUserError(f"region {index} read returned {got} of {count} bytes",
                             errno=errno.EIO)

    # --- helpers
    def region(self, index: int) -> Region | None:
        return self._regions.get(index)

    def regions(self) -> Mapping[int, Region]:
        """The device's regions by index, as this endpoint serves them."""
        return self._regions

    def _access_region(self, acc: RegionAccess, writing: bool) -> Region:
        if acc.count > self.session.caps.max_data_xfer_size:
            raise ProtocolError(f"region access of {acc.count} bytes is too large",
                                errno=errno.E2BIG)
        region = self.region(acc.region)
        if region is None or region.size == 0:
            raise ProtocolError(f"no region {acc.region}", errno=errno.EINVAL)
        outside = acc.offset >= region.size or acc.offset + acc.count > region.size
        short_ok = region.allow_short_read and not writing and acc.offset < region.size
        if outside and not short_ok:
            raise ProtocolError(
                f"region {acc.region}: access {acc.offset:#x}+{acc.count} outside size "
                f"{region.size:#x}",
                errno=errno.EINVAL,
            )
        if (region.write if writing else region.read) is None:
            raise ProtocolError(f"region {acc.region} is not "
                                f"{'writable' if writing else 'readable'}", errno=errno.EINVAL)
        return region

    def write_region(self, index: int, offset: int, data: bytes) -> None:
        region = self._access_region(RegionAccess(offset, index, len(data)), True)
        assert region.write is not None
        region.write(offset, data)


def _check_layout(msg: codec.Message) -> None:
    """The command table's rules for a request's payload (a command the session accepts):
    its size, and its argsz where it has one."""
    cmd = msg.command
    size = len(msg.payload)
    if size < _MIN_PAYLOAD[cmd] or (size != _MIN_PAYLOAD[cmd] and cmd in _EXACT):
        codec.check_request_size(Command(cmd), msg.payload)
    if cmd in _MIN_ARGSZ:
        _check_argsz(msg, _MIN_ARGSZ[cmd])


def _check_argsz(msg: codec.Message, min_argsz: int) -> None:
    """The argsz column of the command table: argsz must cover the request's structure."""
    (argsz,) = _ARGSZ.unpack_from(msg.payload)
    if argsz < min_argsz:
        raise ProtocolError(f"{msg.command_name()} argsz {argsz} < {min_argsz}",
                            errno=errno.EINVAL)


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def _version(ep: Endpoint, msg: codec.Message) -> bytes:
    major, minor, caps = codec.decode_version(msg.payload)
    ours = ep.session.negotiate(major, minor, caps, migration=ep.migration.supported)
    rmajor, rminor = ep.session.reply_version()
    return codec.encode_version(rmajor, rminor, ours)


def _dma_map(ep: Endpoint, msg: codec.Message) -> None:
    req = DmaMap.unpack(msg.payload)
    if req.flags & ~int(DmaMapFlag.READ | DmaMapFlag.WRITE):
        raise ProtocolError(f"DMA_MAP flags {req.flags:#x} unsupported", errno=errno.EINVAL)
    fd = msg.fds.pop() if msg.fds else None
    # the table owns fd from here on, even when it refuses the map
    ep.table.add(req.addr, req.size, req.flags, fd, req.offset if fd is not None else 0)


def _dma_unmap(ep: Endpoint, msg: codec.Message) -> bytes:
    req = DmaUnmap.unpack(msg.payload)
    if req.flags & DmaUnmapFlag.GET_DIRTY_BITMAP:
        raise ProtocolError("dirty page bitmaps are not supported", errno=errno.ENOTSUP)
    if req.flags & ~int(DmaUnmapFlag.ALL):
        raise ProtocolError(f"DMA_UNMAP flags {req.flags:#x} unsupported", errno=errno.EINVAL)
    if req.flags & DmaUnmapFlag.ALL:
        if req.addr or req.size:
            raise ProtocolError("DMA_UNMAP ALL with an address", errno=errno.EINVAL)
        ep.table.remove_all()
    else:
        ep.table.remove(req.addr, req.size)
    return DmaUnmap(DmaUnmap.SIZE, req.flags, req.addr, req.size).pack()


def _get_info(ep: Endpoint, msg: codec.Message) -> bytes:
    del msg  # the argsz column of the command table is checked before dispatch
    flags = DeviceInfoFlag.PCI
    if ep.device.supports_reset():
        flags |= DeviceInfoFlag.RESET
    return DeviceInfo(DeviceInfo.SIZE, int(flags), PCI_NUM_REGIONS, PCI_NUM_IRQS).pack()


def _region_info(ep: Endpoint, msg: codec.Message) -> tuple[bytes, list[int]]:
    req = RegionInfo.unpack(msg.payload)
    if req.index >= PCI_NUM_REGIONS:
        raise ProtocolError(f"no region {req.index}", errno=errno.EINVAL)
    region = ep.region(req.index)
    if region is None:
        return RegionInfo(RegionInfo.SIZE, 0, req.index, 0, 0, 0).pack(), []
    mm = region.mmap
    payload, full = codec.encode_region_info(
        req.argsz,
        req.index,
        region.flags,
        region.size,
        mm.offset if mm is not None else 0,
        sparse_areas=mm.areas if mm is not None else None,
        msix_mappable=region.msix_mappable,
    )
    fds = [mm.fd] if (mm is not None and full) else []
    return payload, fds


def _io_fds(ep: Endpoint, msg: codec.Message) -> bytes:
    req = RegionIoFds.unpack(msg.payload)
    region = ep.region(req.index)
    if region is None or region.size == 0 or req.index == RegionIndex.CONFIG:
        raise ProtocolError(f"region {req.index} has no io fds", errno=errno.EINVAL)
    return RegionIoFds(RegionIoFds.SIZE, 0, req.index, 0).pack()


def _irq_info(ep: Endpoint, msg: codec.Message) -> bytes:
    req = IrqInfo.unpack(msg.payload)
    if req.index >= PCI_NUM_IRQS:
        raise ProtocolError(f"no IRQ index {req.index}", errno=errno.EINVAL)
    count, flags = ep.device.irqs.info(req.index)
    return IrqInfo(IrqInfo.SIZE, int(flags), req.index, count).pack()


def _set_irqs(ep: Endpoint, msg: codec.Message) -> None:
    req = IrqSet.unpack(msg.payload)
    data = msg.payload[IrqSet.SIZE:]
    # the controller validates the whole request, owns the fds now and closes them on error
    fds, msg.fds = msg.fds, []
    ep.device.irqs.set_irqs(req.index, req.flags, req.start, req.count, fds, bytes(data))


_ACCESS = RegionAccess.STRUCT


def _region_read(ep: Endpoint, msg: codec.Message) -> bytes:
    # The hot path of every trapped read: plain struct calls, no dataclass on the way.
    offset, index, count = _ACCESS.unpack(msg.payload)
    region = ep._regions.get(index)
    if (region is None or region.read is None or count > ep.session.caps.max_data_xfer_size
            or offset + count > region.size):
        region = ep._access_region(RegionAccess(offset, index, count), False)
        count = min(count, region.size - offset)  # only the ROM gets here with a short read
    assert region.read is not None
    data = region.read(offset, count)
    if len(data) != count:
        raise ep.short_read(index, len(data), count)
    return _ACCESS.pack(offset, index, count) + data


def _region_write(ep: Endpoint, msg: codec.Message) -> bytes:
    payload = msg.payload
    offset, index, count = _ACCESS.unpack_from(payload)
    data = payload[RegionAccess.SIZE:]
    if len(data) != count:
        raise ProtocolError(
            f"REGION_WRITE count {count} but {len(data)} data bytes", errno=errno.EINVAL
        )
    region = ep._regions.get(index)
    if (region is None or region.write is None or count > ep.session.caps.max_data_xfer_size
            or offset + count > region.size or count == 0):
        region = ep._access_region(RegionAccess(offset, index, count), True)
    assert region.write is not None
    region.write(offset, data)
    return payload[: RegionAccess.SIZE]


def _write_multi(ep: Endpoint, msg: codec.Message) -> bytes:
    head = WriteMulti.unpack(msg.payload)
    body = msg.payload[WriteMulti.SIZE:]
    if head.wr_cnt > 1024 or len(body) != head.wr_cnt * WriteMultiEntry.SIZE:
        raise ProtocolError(f"WRITE_MULTI of {head.wr_cnt} entries in {len(body)} bytes",
                            errno=errno.EINVAL)
    entries = [WriteMultiEntry.unpack(body, i * WriteMultiEntry.SIZE) for i in range(head.wr_cnt)]
    for e in entries:
        if not 1 <= e.count <= 8:
            raise ProtocolError(f"WRITE_MULTI entry count {e.count}", errno=errno.EINVAL)
    for e in entries:
        ep.write_region(e.region, e.offset, e.data[: e.count])
    return WriteMulti(head.wr_cnt).pack()


def _reset(ep: Endpoint, msg: codec.Message) -> None:
    del msg  # header only: the command table's size check has seen to that
    ep.device.irqs.reset()
    ep.device.vfio_reset()
    ep.migration.reset()  # from any migration state (ERROR too): running again


def _unsupported(ep: Endpoint, msg: codec.Message) -> None:
    raise ProtocolError(f"{msg.command_name()} is not supported (the pre-v2 dirty page "
                        "tracking; migration v2 is DEVICE_FEATURE)", errno=errno.ENOTSUP)


_HANDLERS: dict[int, Handler] = {
    Command.VERSION: _version,
    Command.DMA_MAP: _dma_map,
    Command.DMA_UNMAP: _dma_unmap,
    Command.DEVICE_GET_INFO: _get_info,
    Command.DEVICE_GET_REGION_INFO: _region_info,
    Command.DEVICE_GET_REGION_IO_FDS: _io_fds,
    Command.DEVICE_GET_IRQ_INFO: _irq_info,
    Command.DEVICE_SET_IRQS: _set_irqs,
    Command.REGION_READ: _region_read,
    Command.REGION_WRITE: _region_write,
    Command.REGION_WRITE_MULTI: _write_multi,
    Command.DEVICE_RESET: _reset,
    Command.DIRTY_PAGES: _unsupported,
    Command.DEVICE_FEATURE: migration.device_feature,
    Command.MIG_DATA_READ: migration.mig_data_read,
    Command.MIG_DATA_WRITE: migration.mig_data_write,
}

#: Commands whose payload is exactly their fixed structure (nothing may follow it).
_EXACT = frozenset(int(cmd) for cmd, spec in COMMANDS.items() if spec.request_tail is Tail.NONE)

#: Smallest argsz per command that has one to check (the table's argsz column).
_MIN_ARGSZ: dict[int, int] = {
    int(cmd): spec.min_argsz for cmd, spec in COMMANDS.items() if spec.min_argsz is not None
}
_ARGSZ = struct.Struct("<I")  # every argsz is the request's first u32

#: Smallest payload per command (its fixed structure), as plain ints for the hot path.
_MIN_PAYLOAD: dict[int, int] = {
    int(cmd): (spec.request.SIZE if spec.request is not None else 0)
    for cmd, spec in COMMANDS.items()
}
