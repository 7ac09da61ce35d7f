"""Migration v2 on the wire: DEVICE_FEATURE, MIG_DATA_READ and MIG_DATA_WRITE.

:class:`Migration` is one connection's migration state for its device; the endpoint holds it
and calls the handlers below. The states and arcs are the tables of
:mod:`vfio_user_server.protocol.migration`; what an arc does follows from their columns:

* leaving a running state quiesces the device (:meth:`PciDevice.quiesced
  <vfio_user_server.device.PciDevice.quiesced>`, held until it runs again): no DMA, no
  interrupts, and the endpoint refuses BAR accesses (:attr:`Migration.gated`) with EBUSY;
  config space and the ROM stay readable and config space writable, as the kernel's FSM wants
  ("external subsystems" keep working in STOP);
* entering a saving state (STOP_COPY) takes the device's state (``save_state()``) into the
  stream MIG_DATA_READ hands out; leaving it drops what was not read;
* entering RESUMING opens an input stream; the MIG_DATA_WRITE that completes it is validated
  and loaded then (``load_state()``: everything checked, nothing applied on refusal), so a
  corrupt or truncated stream is refused by that write and the device stays in RESUMING,
  untouched; leaving RESUMING without a whole, loaded stream is EINVAL;
* DEVICE_RESET, from any state, resets the device and makes it run again (RUNNING), the only
  way out of ERROR; a client that leaves does the same without the reset.

A device supports migration when ``supports_migration()`` says so (a :class:`PciDevice
<vfio_user_server.device.PciDevice>` that declares state fields); the server then advertises
``migration`` in its VERSION reply. Otherwise every migration feature is ENOTSUP, as are the
DMA logging features (dirty page tracking is not implemented) for every device.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from typing import TYPE_CHECKING, Protocol, cast

from . import state as _state
from .errors import ProtocolError, VfioUserError
from .protocol import codec
from .protocol.constants import (
    FEATURE_INDEX_MASK,
    Command,
    Feature,
    FeatureFlag,
    MigState,
    RegionIndex,
)
from .protocol.migration import FLAGS, STATES, InStream, OutStream, path, stream
from .protocol.structs import (
    DeviceFeature,
    MigData,
    MigDeviceState,
    MigrationFeature,
    RegionAccess,
    WriteMulti,
    WriteMultiEntry,
)

if TYPE_CHECKING:
    from .endpoint import Endpoint, VfioDevice
    from .protocol.session import Session

log = logging.getLogger(__name__)

__all__ = ["Migration"]


class _Migratable(Protocol):
    """What migration needs from a device (PciDevice has it)."""

    def save_state(self) -> bytes: ...

    def load_state(self, data: bytes) -> None: ...

    def quiesced(self) -> contextlib.AbstractContextManager[None]: ...


#: Commands a stopped device refuses when they reach a BAR (config space and ROM are fine).
_REGION_COMMANDS = frozenset({int(Command.REGION_READ), int(Command.REGION_WRITE),
                              int(Command.REGION_WRITE_MULTI)})
#: Operations per migration feature (PROBE is allowed for both).
_OPERATIONS = {Feature.MIGRATION: int(FeatureFlag.GET),
               Feature.MIG_DEVICE_STATE: int(FeatureFlag.GET | FeatureFlag.SET)}
_ALL_OPS = int(FeatureFlag.GET | FeatureFlag.SET | FeatureFlag.PROBE)


class Migration:
    """The migration state of one connection's device."""

    def __init__(self, device: VfioDevice, session: Session) -> None:
        self.device = device
        self.session = session
        self.supported = device.supports_migration()
        self.state = MigState.RUNNING
        #: commands the endpoint passes to :meth:`check_access` first (none while running)
        self.gated: frozenset[int] = frozenset()
        self._stopped = contextlib.ExitStack()  # holds the device quiesced
        self._out: OutStream | None = None
        self._in: InStream | None = None

    @property
    def _dev(self) -> _Migratable:
        return cast(_Migratable, self.device)

    # --- the state machine ------------------------------------------------------------------
    def set_state(self, target: MigState) -> None:
        """Go to ``target`` arc by arc. When an arc fails the device is in the last state
        reached (the failed arc undid itself: a failed quiesce resumed the device), except
        when the device failed to run again: that is ERROR, which only DEVICE_RESET leaves."""
        for nxt in path(self.state, target):
            here = self.state
            try:
                self._arc(here, nxt)
            except VfioUserError:
                raise
            except Exception as exc:  # a device hook's own failure
                log.exception("migration arc %s -> %s failed", here.name, nxt.name)
                if STATES[nxt].running and not STATES[here].running:
                    self._enter(MigState.ERROR)  # stopped or running: nobody knows
                errno_ = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
                raise VfioUserError(f"migration arc {here.name} -> {nxt.name} failed: {exc}",
                                    errno=errno_) from exc
            log.info("migration state %s -> %s", here.name, nxt.name)
            self._enter(nxt)

    def _arc(self, here: MigState, nxt: MigState) -> None:
        """What the arc ``here -> nxt`` does, from the columns of the two states."""
        was, will = STATES[here], STATES[nxt]
        if was.writes and not will.writes and (self._in is None or not self._in.loaded):
            got = 0 if self._in is None else self._in.received
            raise ProtocolError(f"the migration stream is incomplete ({got} bytes written): "
                                "nothing loaded", errno=errno.EINVAL)
        if was.running and not will.running:
            # quiesced() resumes the device itself when quiesce() fails
            self._stopped.enter_context(self._dev.quiesced())
        if will.reads and not was.reads:
            self._out = OutStream(stream(self._dev.save_state()))
        if will.writes and not was.writes:
            self._in = InStream(_state.MAX_STATE_SIZE)
        if will.running and not was.running:
            self._stopped.close()  # resume

    def _enter(self, state: MigState) -> None:
        spec = STATES[state]
        if not spec.reads:
            self._out = None
        if not spec.writes:
            self._in = None
        self.state = state
        self.gated = frozenset() if spec.running else _REGION_COMMANDS

    def check_access(self, msg: codec.Message) -> None:
        """A region access while the device is stopped: refused if it reaches a BAR."""
        cmd = msg.command
        if cmd == Command.REGION_WRITE_MULTI:
            head = WriteMulti.unpack(msg.payload)
            body = msg.payload[WriteMulti.SIZE:]
            count = min(head.wr_cnt, len(body) // WriteMultiEntry.SIZE)
            regions = {WriteMultiEntry.unpack(body, i * WriteMultiEntry.SIZE).region
                       for i in range(count)}
        else:
            regions = {RegionAccess.unpack(msg.payload).region}
        writing = cmd != Command.REGION_READ
        for region in regions:
            if region == RegionIndex.CONFIG or (region == RegionIndex.ROM and not writing):
                continue
            raise ProtocolError(f"region {region}: the device is stopped for migration "
                                f"({self.state.name})", errno=errno.EBUSY)

    def reset(self) -> None:
        """DEVICE_RESET (the device is reset already) or the client left: run again."""
        self._enter(MigState.RUNNING)
        try:
            self._stopped.close()
        except Exception:
            log.exception("resuming the device after migration failed")

    close = reset

    # --- data -------------------------------------------------------------------------------
    def read(self, size: int) -> bytes:
        if not STATES[self.state].reads or self._out is None:
            raise ProtocolError(f"MIG_DATA_READ in migration state {self.state.name}",
                                errno=errno.EINVAL)
        return self._out.read(size)

    def write(self, data: bytes) -> None:
        if not STATES[self.state].writes or self._in is None:
            raise ProtocolError(f"MIG_DATA_WRITE in migration state {self.state.name}",
                                errno=errno.EINVAL)
        whole = self._in.check(data)
        if whole is not None:
            self._dev.load_state(whole)  # StateError: refused, nothing applied
        self._in.accept(data, whole=whole is not None)


# --- handlers (the endpoint's table points here) ----------------------------------------------

def _require(ep: Endpoint, what: str) -> Migration:
    mig = ep.migration
    if not mig.supported:
        raise ProtocolError(f"{what}: the device does not support migration (it declares "
                            "no state)", errno=errno.ENOTSUP)
    return mig


def device_feature(ep: Endpoint, msg: codec.Message) -> bytes:
    req = DeviceFeature.unpack(msg.payload)
    data = bytes(msg.payload[DeviceFeature.SIZE:])
    index, ops = req.flags & FEATURE_INDEX_MASK, req.flags & ~FEATURE_INDEX_MASK
    if ops & ~_ALL_OPS:
        raise ProtocolError(f"DEVICE_FEATURE flags {req.flags:#x}: unknown bits",
                            errno=errno.EINVAL)
    try:
        feature = Feature(index)
    except ValueError:
        raise ProtocolError(f"no device feature {index}", errno=errno.ENOTSUP) from None
    if feature not in _OPERATIONS:
        raise ProtocolError(f"{feature.name}: dirty page logging is not supported",
                            errno=errno.ENOTSUP)
    mig = _require(ep, f"DEVICE_FEATURE {feature.name}")
    asked = ops & ~int(FeatureFlag.PROBE)
    if asked & ~_OPERATIONS[feature]:
        raise ProtocolError(f"{feature.name} does not support flags {req.flags:#x}",
                            errno=errno.EINVAL)
    if ops & FeatureFlag.PROBE or asked == FeatureFlag.SET:
        if req.argsz < len(msg.payload):
            raise ProtocolError(f"DEVICE_FEATURE argsz {req.argsz} < {len(msg.payload)}",
                                errno=errno.EINVAL)
        if asked == FeatureFlag.SET and not ops & FeatureFlag.PROBE:
            target = MigDeviceState.unpack(data).device_state
            try:
                state = MigState(target)
            except ValueError:
                raise ProtocolError(f"no migration state {target}", errno=errno.EINVAL) from None
            mig.set_state(state)
        return bytes(msg.payload)  # SET and PROBE: the request, echoed
    if asked != FeatureFlag.GET:
        raise ProtocolError(f"DEVICE_FEATURE flags {req.flags:#x}: GET, SET or PROBE",
                            errno=errno.EINVAL)
    if feature is Feature.MIGRATION:
        body = MigrationFeature(int(FLAGS)).pack()
    else:
        body = MigDeviceState(int(mig.state), 0).pack()
    need = DeviceFeature.SIZE + len(body)
    if req.argsz < need:
        raise ProtocolError(f"DEVICE_FEATURE GET argsz {req.argsz} < {need}",
                            errno=errno.EINVAL)
    return DeviceFeature(need, req.flags).pack() + body


def mig_data_read(ep: Endpoint, msg: codec.Message) -> bytes:
    mig = _require(ep, "MIG_DATA_READ")
    req = MigData.unpack(msg.payload)
    limit = min(ep.session.caps.max_data_xfer_size, ep.session.client_max_data_xfer)
    if req.size > limit:
        raise ProtocolError(f"MIG_DATA_READ of {req.size} bytes exceeds {limit}",
                            errno=errno.EINVAL)
    if req.argsz < MigData.SIZE + req.size:
        raise ProtocolError(f"MIG_DATA_READ argsz {req.argsz} < {MigData.SIZE + req.size}",
                            errno=errno.EINVAL)
    data = mig.read(req.size)
    return MigData(MigData.SIZE + len(data), len(data)).pack() + data


def mig_data_write(ep: Endpoint, msg: codec.Message) -> None:
    mig = _require(ep, "MIG_DATA_WRITE")
    req = MigData.unpack(msg.payload)
    data = bytes(msg.payload[MigData.SIZE:])
    if req.size != len(data):
        raise ProtocolError(f"MIG_DATA_WRITE size {req.size} but {len(data)} data bytes "
                            "(truncated?)", errno=errno.EINVAL)
    if req.size > ep.session.caps.max_data_xfer_size:
        raise ProtocolError(f"MIG_DATA_WRITE of {req.size} bytes exceeds "
                            f"{ep.session.caps.max_data_xfer_size}", errno=errno.EINVAL)
    mig.write(data)

