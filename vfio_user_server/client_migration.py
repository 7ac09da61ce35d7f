"""Migration v2 for :class:`vfio_user_server.client.Client` (docs/state.md, "Migration").

QEMU's client does not send DEVICE_FEATURE or MIG_DATA_* yet; ours does, so that a running
device moves between two server processes::

    src.migrate_to(dst)   # both negotiated; dst's interrupts set up as QEMU's destination would

The commands one by one: :meth:`MigrationClient.migration_flags`,
:meth:`~MigrationClient.mig_state`, :meth:`~MigrationClient.set_mig_state`,
:meth:`~MigrationClient.mig_read`, :meth:`~MigrationClient.mig_write`.
"""

from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING, Any

from .errors import ProtocolError
from .protocol import codec
from .protocol.constants import Command, DmaMapFlag, Feature, FeatureFlag, MigFlag, MigState
from .protocol.session import DEFAULT_MAX_DATA_XFER
from .protocol.structs import DeviceFeature, MigData, MigDeviceState, MigrationFeature

if TYPE_CHECKING:
    from .client import Client, MemoryRegion

__all__ = ["MigrationClient"]


class MigrationClient:
    """The migration half of :class:`~vfio_user_server.client.Client` (a mixin)."""

    memory: list[MemoryRegion]
    server_caps: dict[str, Any]

    def _call(self, command: Command, payload: bytes = b"", fds: list[int] | None = None
              ) -> codec.Message:
        raise NotImplementedError  # Client's

    def dma_map(self, iova: int, size: int, prot: int = 3, *, fd: int | None = None,
                offset: int = 0) -> None:
        raise NotImplementedError  # Client's

    def device_feature(self, flags: int, data: bytes = b"", argsz: int | None = None
                       ) -> tuple[DeviceFeature, bytes]:
        """DEVICE_FEATURE; the reply's structure and its data."""
        if argsz is None:
            argsz = DeviceFeature.SIZE + max(len(data), 8)
        reply = self._call(Command.DEVICE_FEATURE, DeviceFeature(argsz, flags).pack() + data)
        return DeviceFeature.unpack(reply.payload), bytes(reply.payload[DeviceFeature.SIZE:])

    def migration_flags(self) -> MigFlag:
        """VFIO_DEVICE_FEATURE_MIGRATION: which optional states the device has."""
        _, data = self.device_feature(Feature.MIGRATION | FeatureFlag.GET)
        return MigFlag(MigrationFeature.unpack(data).flags)

    def mig_state(self) -> MigState:
        _, data = self.device_feature(Feature.MIG_DEVICE_STATE | FeatureFlag.GET)
        return MigState(MigDeviceState.unpack(data).device_state)

    def set_mig_state(self, state: MigState) -> None:
        self.device_feature(Feature.MIG_DEVICE_STATE | FeatureFlag.SET,
                            MigDeviceState(int(state), 0).pack())

    def _chunk(self) -> int:
        return min(int(self.server_caps.get("max_data_xfer_size", DEFAULT_MAX_DATA_XFER)),
                   DEFAULT_MAX_DATA_XFER)

    def mig_read(self, size: int) -> bytes:
        """One MIG_DATA_READ; fewer bytes than asked for is the end of the stream."""
        reply = self._call(Command.MIG_DATA_READ, MigData(MigData.SIZE + size, size).pack())
        head = MigData.unpack(reply.payload)
        data = bytes(reply.payload[MigData.SIZE:])
        if head.size != len(data) or head.size > size:
            raise ProtocolError(f"MIG_DATA_READ reply of {len(data)} bytes says {head.size}")
        return data

    def mig_read_all(self) -> bytes:
        """Read the whole migration stream (in a saving state)."""
        out = bytearray()
        chunk = self._chunk()
        while True:
            piece = self.mig_read(chunk)
            out += piece
            if len(piece) < chunk:
                return bytes(out)

    def mig_write(self, data: bytes) -> None:
        self._call(Command.MIG_DATA_WRITE, MigData(MigData.SIZE + len(data), len(data)).pack()
                   + data)

    def mig_write_all(self, data: bytes) -> None:
        chunk = self._chunk()
        for at in range(0, len(data), chunk):
            self.mig_write(data[at:at + chunk])

    def migrate_to(self, other: Client) -> int:
        """Move this client's running device to the device ``other`` serves (another server,
        same device class), as a VMM migrates: STOP_COPY here, read the state out, RESUMING
        there, write it in, RUNNING there; this device is left in STOP. Returns the stream's
        size. If the destination refuses (another device, a state it cannot take), this device
        runs again and the error is raised; ``other`` is left where it failed (RESUMING).

        Guest memory: ``other`` gets this client's DMA maps at the same IOVAs it has not got
        yet, fd-backed ones shared (the same RAM, as a local migration with shared memory),
        the others copied once this device is stopped. ``other``'s interrupts are the
        caller's to set up beforehand, as QEMU's destination does when it realizes the device.
        """
        for client in (self, other):
            if "migration" not in client.server_caps:
                raise ProtocolError("the server does not advertise migration")
            if not client.migration_flags() & MigFlag.STOP_COPY:
                raise ProtocolError("the device cannot STOP_COPY")
        self.set_mig_state(MigState.STOP_COPY)
        try:
            data = self.mig_read_all()
            _share_memory(self.memory, other)
            other.set_mig_state(MigState.RESUMING)
            other.mig_write_all(data)
            other.set_mig_state(MigState.RUNNING)
        except BaseException:
            self.set_mig_state(MigState.RUNNING)  # as a VMM does: the source runs on
            raise
        self.set_mig_state(MigState.STOP)
        return len(data)


def _share_memory(regions: list[MemoryRegion], other: Client) -> None:
    from .client import MemoryRegion

    have = {(r.iova, r.size) for r in other.memory}
    for reg in regions:
        if (reg.iova, reg.size) in have:
            continue
        if reg.fd is not None:
            fd = os.dup(reg.fd)
            copy = MemoryRegion(reg.iova, reg.size, fd, mmap.mmap(fd, reg.base + reg.size),
                                reg.prot, reg.base)
            other.dma_map(reg.iova, reg.size, reg.prot, fd=fd, offset=reg.base)
            other.memory.append(copy)
        else:
            new = other.add_memory(reg.iova, reg.size, fd_backed=False,
                                   writable=bool(reg.prot & DmaMapFlag.WRITE))
            new.mem[:] = reg.mem[:]
