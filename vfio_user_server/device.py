"""PciDevice: the one class a device author writes.

A device is declared with class attributes and answers BAR accesses with two methods; it
never sees the wire format::

    class Blinker(PciDevice):
        vendor_id = 0x1B36
        device_id = 0x1234
        class_code = 0xFF0000
        bars = {0: Bar(4096)}
        msix_vectors = 1

        def bar_read(self, bar: int, offset: int, size: int) -> int:
            return self.leds if offset == 0 else 0

        def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
            self.leds = value
            self.interrupt(0)

What the framework does for it:

* config space (type-0 header, BAR sizing, ROM BAR, capabilities) from
  :mod:`vfio_user_server.pci`, with PM, MSI, MSI-X and PCI Express added from the class
  attributes and any others returned by :meth:`PciDevice.capabilities`;
* the MSI-X table and PBA inside their BAR (QEMU emulates the table itself and only reads the
  PBA; a client that writes the table, like :mod:`vfio_user_server.client`, gets a working one);
* interrupts (:meth:`interrupt`, :meth:`set_intx`) through the eventfds the client gave, with
  INTx automasking, COMMAND.INTX_DISABLE and the Status interrupt bit;
* DMA (:attr:`dma`) and a worker thread (:meth:`defer`) for work that needs message DMA;
* DEVICE_RESET and FLR: config space back to power-on values, then :meth:`reset`.

The hooks a device writes are :meth:`~PciDevice.reset`, :meth:`~PciDevice.on_connect` and
:meth:`~PciDevice.on_disconnect`. The server's side of the same events is
:class:`~vfio_user_server.endpoint.VfioDevice`'s ``vfio_reset``, ``vfio_attach`` and
``vfio_detach``, final here: defining one of those (or their old names ``device_reset``,
``client_connected``, ``client_disconnected``) in a subclass is a
:class:`~vfio_user_server.errors.DeviceDefinitionError`.

Handlers run on the server's loop thread with :attr:`lock` held; device threads that touch the
same state take the same lock.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, ClassVar, final

from . import state as _state
from .bar_region import bar_region
from .dma import DmaAccessor
from .endpoint import DeviceContext, Region, VfioDevice
from .errors import DeviceDefinitionError, DmaError, IrqError, StateError
from .irq import IrqController, IrqIndex
from .mapped import MappedBar, MappedBars, map_bar
from .options import Option
from .pci import (
    COMMAND,
    COMMAND_INTX_DISABLE,
    COMMAND_MASTER,
    NUM_BARS,
    Bar,
    Capability,
    ExtendedCapability,
    Header,
    Msi,
    MsiX,
    PciConfig,
    PciExpress,
    PowerManagement,
)
from .protocol.constants import RegionIndex

__all__ = ["Option", "PciDevice", "state_dma_maps"]

log = logging.getLogger(__name__)

#: The header values a state must share with the device that loads it.
_IDENTITY = ("vendor_id", "device_id", "subsystem_vendor_id", "subsystem_id", "revision",
             "class_code")


#: Server-side names a PciDevice subclass must not define -> the hook to write instead. The
#: ``vfio_*`` methods are final; the others are their earlier names, which the server no
#: longer calls (a device that still defines one would lose its resets or connections).
_SERVER_SIDE = {
    "vfio_reset": "reset",
    "vfio_attach": "on_connect",
    "vfio_detach": "on_disconnect",
    "device_reset": "reset",
    "client_connected": "on_connect",
    "client_disconnected": "on_disconnect",
}


class PciDevice(VfioDevice):
    """Base class of declarative PCI devices served over vfio-user."""

    # --- identity ---------------------------------------------------------------------------
    vendor_id: ClassVar[int]
    device_id: ClassVar[int]
    subsystem_vendor_id: ClassVar[int] = 0
    subsystem_id: ClassVar[int] = 0
    revision: ClassVar[int] = 0
    #: 24 bits: base class << 16 | subclass << 8 | programming interface
    class_code: ClassVar[int] = 0xFF0000
    #: 0: no INTx; 1..4: INTA..INTD
    interrupt_pin: ClassVar[int] = 1

    # --- resources --------------------------------------------------------------------------
    #: BAR slot -> Bar. A 64-bit BAR also takes the next slot.
    bars: ClassVar[Mapping[int, Bar]] = {}
    #: Expansion ROM contents (padded to a power of two >= 2 KiB), or None.
    rom: ClassVar[bytes | None] = None
    #: PCI Express (4 KiB config space, PCIe capability with FLR).
    express: ClassVar[bool] = False
    power_management: ClassVar[bool] = True
    #: MSI vectors (0: no MSI capability); 64-bit addresses, per-vector masking.
    msi_vectors: ClassVar[int] = 0
    #: MSI-X vectors (0: no MSI-X); table in ``msix_bar`` at ``msix_table_offset``,
    #: PBA at ``msix_pba_offset`` (default: right after the table).
    msix_vectors: ClassVar[int] = 0
    msix_bar: ClassVar[int] = 0
    msix_table_offset: ClassVar[int] = 0
    msix_pba_offset: ClassVar[int | None] = None

    #: Command-line options (``vfio-user-server ... DEVICE --option value``); each value goes
    #: to the constructor as a keyword (see :mod:`vfio_user_server.options`).
    options: ClassVar[Sequence[Option]] = ()

    # --- state (save_state / load_state; docs/state.md) ---------------------------------------
    #: Attributes saved and loaded with the device state, beside what the framework owns.
    #: Their values are None, bools, ints, str, bytes (a bytearray is restored as one) and
    #: lists and dicts of those; a property with a setter works too. Subclasses add theirs
    #: (the names of every class in the MRO count).
    state_fields: ClassVar[tuple[str, ...]] = ()
    #: Version of the device's own part of the state: bump it when a field's meaning
    #: changes. A state of another version is refused.
    state_version: ClassVar[int] = 1

    #: Guest kernel modules that drive this device (the guest-test kit and the launcher load
    #: them, with their dependencies).
    guest_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        if not hasattr(type(self), "vendor_id") or not hasattr(type(self), "device_id"):
            raise DeviceDefinitionError(f"{type(self).__name__} needs vendor_id and device_id")
        self.lock = threading.RLock()
        self._ctx: DeviceContext | None = None
        self._intx_level = False
        self._msix_table_used = False
        self._quiesce_depth = 0
        self.msi: Msi | None = None
        self.msix: MsiX | None = None
        caps: list[Capability] = []
        if self.power_management:
            caps.append(PowerManagement())
        if self.msi_vectors:
            self.msi = Msi(self.msi_vectors, address64=True, per_vector_mask=True,
                           on_change=self._msi_changed)
            caps.append(self.msi)
        if self.msix_vectors:
            self.msix = MsiX(
                self.msix_vectors,
                table_bar=self.msix_bar,
                table_offset=self.msix_table_offset,
                pba_offset=self.msix_pba_offset,
                on_mask_change=self._msix_mask_changed,
            )
            caps.append(self.msix)
        if self.express:
            caps.append(PciExpress(flr=True, on_flr=self._flr))
        caps.extend(self.capabilities())
        rom = self.rom
        rom_size = None
        if rom is not None:
            rom_size = max(2048, 1 << max(0, (len(rom) - 1).bit_length()))
            self._rom_image = bytes(rom).ljust(rom_size, b"\xff")
        self.config = PciConfig(
            Header(
                vendor_id=self.vendor_id,
                device_id=self.device_id,
                revision=self.revision,
                class_code=self.class_code,
                subsystem_vendor_id=self.subsystem_vendor_id,
                subsystem_id=self.subsystem_id,
                interrupt_pin=self.interrupt_pin,
            ),
            bars=dict(self.bar_layout()),
            rom_size=rom_size,
            capabilities=caps,
            extended_capabilities=self.extended_capabilities(),
            express=self.express,
        )
        self.config.space.on_write(COMMAND, COMMAND + 2, self._command_written)
        self.irqs = IrqController(
            intx=self.interrupt_pin != 0,
            msi_vectors=self.msi_vectors,
            msix_vectors=self.msix_vectors,
            is_masked=self._vector_masked,
            set_pending=self._vector_pending,
        )
        self._regions = self._build_regions()

    # --- hooks for device authors -------------------------------------------------------------
    def bar_layout(self) -> Mapping[int, Bar]:
        """This instance's BARs: :attr:`bars` unless options change them (mapped areas)."""
        return self.bars

    def capabilities(self) -> list[Capability]:
        """Extra standard capabilities (vendor-specific, ...), after the declared ones."""
        return []

    def extended_capabilities(self) -> list[ExtendedCapability]:
        """Extended capabilities (PCI Express devices only)."""
        return []

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        """Read ``size`` (1, 2, 4 or 8) bytes at ``offset`` of BAR ``bar``; little-endian."""
        del bar, offset, size
        return 0

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        """Write ``size`` bytes of ``value`` at ``offset`` of BAR ``bar``."""
        del bar, offset, size, value

    def reset(self) -> None:
        """Bring device state to power-on (DEVICE_RESET, FLR). Config space is done already.

        Called with :attr:`lock` held.
        """

    def on_connect(self) -> None:
        """A client connected (after VERSION): :attr:`dma` and :meth:`defer` work from now."""

    def on_disconnect(self) -> None:
        """The client left; DMA maps and interrupt fds are gone. Device state is kept."""

    def quiesce(self) -> None:
        """Finish in-flight work and start no more until :meth:`resume` (state saving and
        loading). Called without :attr:`lock`; the caller sees to it that no BAR access
        arrives meanwhile, while DMA replies still do (in-flight work may be waiting for one:
        message DMA). Default: nothing to drain."""

    def resume(self) -> None:
        """Undo :meth:`quiesce`: pick up work again (the state may be a new one)."""

    def check_state(self, fields: Mapping[str, _state.StateValue]) -> None:
        """Refuse (:class:`~vfio_user_server.errors.StateError`) declared field values this
        device cannot take. Called before anything is loaded; the types already match the
        current values'."""
        del fields

    def state_loaded(self) -> None:
        """A state was just loaded (lock held): re-derive what is not in the fields."""

    def state_lost(self, reason: str) -> None:
        """The device's own state could not be carried (``load_state(..., reset_own=True)``:
        a hot reload to code of another :attr:`state_version` or fields): the framework's
        part (config space, interrupts) is the guest's, the fields are at power-on values.
        Tell the guest through the device's reset path (NVMe sets CSTS.CFS, virtio
        DEVICE_NEEDS_RESET); lock held. Default: nothing, the device just starts afresh."""
        del reason

    # --- services for device authors ---------------------------------------------------------
    def mapped(self, bar: int) -> MappedBar:
        """The memory of BAR ``bar``'s mapped areas (:mod:`vfio_user_server.mapped`)."""
        return self._mapped[bar]

    @property
    def dma(self) -> DmaAccessor:
        """Guest memory, by IOVA (direct through the client's fds, or by messages)."""
        if self._ctx is None:
            raise DmaError("no client is connected")
        return self._ctx.dma

    @property
    def connected(self) -> bool:
        return self._ctx is not None

    def defer(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the connection's worker thread (message DMA is allowed there)."""
        if self._ctx is None:
            raise DmaError("no client is connected")
        return self._ctx.defer(fn)

    def interrupt(self, vector: int = 0) -> bool:
        """Signal an edge interrupt: MSI-X if enabled, else MSI, else pulse INTx.

        Returns whether a message was delivered (False when masked: it is pending then).
        For level-triggered INTx semantics use :meth:`set_intx`.
        """
        if self.msix is not None and self.msix.enabled:
            return self.irqs.trigger(IrqIndex.MSIX, vector)
        if self.msi is not None and self.msi.enabled:
            return self.irqs.trigger(IrqIndex.MSI, vector)
        if self.interrupt_pin:
            self.set_intx(True)
            return True
        return False

    def set_intx(self, level: bool) -> None:
        """Drive the INTx line (level-triggered; the client sees it through automasking)."""
        with self.lock:
            self._intx_level = level
            self.config.set_interrupt_status(level)
            if level:
                self.irqs.intx_assert()
            else:
                self.irqs.intx_deassert()

    def report_error(self) -> bool:
        """Signal an unrecoverable device error on the ERR eventfd (QEMU stops the VM)."""
        return self.irqs.trigger(IrqIndex.ERR, 0)

    @property
    def intx_level(self) -> bool:
        return self._intx_level

    @property
    def bus_master(self) -> bool:
        return bool(self.config.command & COMMAND_MASTER)

    # --- device state --------------------------------------------------------------------------
    def supports_migration(self) -> bool:
        """Migration v2 (docs/state.md, "Migration"): for a device that declares state."""
        return bool(self.declared_state_fields())

    @classmethod
    def declared_state_fields(cls) -> tuple[str, ...]:
        """Every class's :attr:`state_fields`, base classes first, each name once."""
        names: dict[str, None] = {}
        for klass in reversed(cls.__mro__):
            for name in vars(klass).get("state_fields", ()):
                names[name] = None
        return tuple(names)

    @contextmanager
    def quiesced(self) -> Iterator[None]:
        """:meth:`quiesce` on entry (outermost only), :meth:`resume` on exit."""
        with self.lock:
            self._quiesce_depth += 1
            first = self._quiesce_depth == 1
        try:
            if first:
                self.quiesce()
            yield
        finally:
            with self.lock:
                self._quiesce_depth -= 1
                last = self._quiesce_depth == 0
            if first and last:
                self.resume()

    def save_state(self) -> bytes:
        """The device's state as bytes (docs/state.md): config space, MSI-X table and PBA,
        interrupt state, DMA map metadata (no fds) and the declared :attr:`state_fields`.

        In-flight work is drained first (:meth:`quiesce`), then resumed.
        """
        with self.quiesced(), self.lock:
            return _state.encode(self._capture())

    def load_state(self, data: bytes, *, reset_own: bool = False) -> bool:
        """Load what :meth:`save_state` gave (here or in another process); True.

        Everything is decoded and checked before anything is applied; a state of another
        format or :attr:`state_version`, of another device class or IDs, or corrupt, is a
        :class:`~vfio_user_server.errors.StateError` and the device is left untouched. DMA
        maps are not loaded: they come with their fds through the connection (see
        :func:`state_dma_maps`).

        ``reset_own`` (hot reload): when only the device's own part is refused (another
        :attr:`state_version`, other fields, :meth:`check_state` or a setter says no), the
        framework's part is loaded all the same, the fields keep their current values (a new
        device's: power-on), :meth:`state_lost` tells the guest, and the result is False.
        """
        body = _state.decode(data)
        try:
            image = self._validate(body)
        except _OwnStateError as exc:
            if not reset_own:
                raise
            return self._lose_state(self._validate(body, own=False), str(exc))
        with self.quiesced(), self.lock:
            before = self._capture()
            try:
                self._apply(image)
            except Exception as exc:
                self._apply(self._validate(before))
                if not reset_own:
                    raise StateError(f"loading the state failed, nothing loaded: {exc}") from exc
                return self._lose_state(self._validate(body, own=False), str(exc))
        return True

    def _lose_state(self, image: _StateImage, reason: str) -> bool:
        log.warning("%s: the device's own state is not carried (%s): reset, guest told",
                    type(self).__name__, reason)
        with self.quiesced(), self.lock:
            self._apply(image)
            self.state_lost(reason)
        return False

    def _identity(self) -> dict[str, Any]:
        cls = type(self)
        return {"class": f"{cls.__module__}.{cls.__qualname__}",
                **{name: getattr(self.config.header, name) for name in _IDENTITY}}

    def _capture(self) -> dict[str, Any]:
        """The state body (lock held)."""
        msix = None
        if self.msix is not None:
            table, pending = self.msix.table.snapshot()
            msix = {"table": _b64(table), "pending": pending,
                    "table_used": self._msix_table_used}
        vectors = {}
        for idx in IrqIndex:
            st = self.irqs.state(idx)
            vectors[idx.name] = {"masked": list(st.masked), "pending": list(st.pending)}
        maps = []
        if self._ctx is not None:
            for m in self._ctx.table.maps():
                maps.append({"iova": m.iova, "size": m.size, "prot": int(m.prot),
                             "offset": m.offset, "fd": m.direct})
        cls_name = type(self).__name__
        fields = {name: _state.encode_value(getattr(self, name), f"{cls_name}.{name}")
                  for name in self.declared_state_fields()}
        return {
            "device": self._identity(),
            "state_version": self.state_version,
            "config": {"size": self.config.size, "bytes": _b64(bytes(self.config.space.data))},
            "msix": msix,
            "irqs": {"intx_level": self._intx_level, "vectors": vectors},
            "dma_maps": maps,
            "fields": fields,
        }

    def _validate(self, body: dict[str, Any], own: bool = True) -> _StateImage:
        """Check a decoded body against this device; the image to apply (nothing applied).
        ``own=False``: the framework's part only (the image has no fields)."""
        r = _state.Reader(body, "state").keys(
            "device", "state_version", "config", "msix", "irqs", "dma_maps", "fields")
        ident = r.sub("device").obj
        if ident != self._identity():
            raise StateError(f"the state is of another device: {ident}, this is "
                             f"{self._identity()}")
        version = r.integer("state_version", 0, 1 << 31)
        if version != self.state_version and own:
            raise _OwnStateError(f"{type(self).__name__} state version {version}; this code "
                             f"reads version {self.state_version}")
        cfg = r.sub("config").keys("size", "bytes")
        size = cfg.integer("size")
        config = cfg.blob("bytes")
        if size != self.config.size or len(config) != size:
            raise StateError(f"config space of {len(config)} bytes, this device has "
                             f"{self.config.size}")
        self._check_config(config)
        msix = r.optional("msix")
        msix_image = None
        if (msix is None) != (self.msix is None):
            raise StateError("MSI-X present in only one of the state and the device")
        if msix is not None and self.msix is not None:
            msix.keys("table", "pending", "table_used")
            table, pending = msix.blob("table"), msix.integer("pending", 0, (1 << 2048) - 1)
            problem = self.msix.table.check_image(table, pending)
            if problem is not None:
                raise StateError(problem)
            msix_image = (table, pending, msix.flag("table_used"))
        irqs = r.sub("irqs").keys("intx_level", "vectors")
        vec_reader = irqs.sub("vectors").keys(*(idx.name for idx in IrqIndex))
        vectors: dict[IrqIndex, tuple[list[bool], list[bool]]] = {}
        for idx in IrqIndex:
            v = vec_reader.sub(idx.name).keys("masked", "pending")
            masked, pending_bits = v.flags("masked"), v.flags("pending")
            count = self.irqs.state(idx).count
            if len(masked) != count or len(pending_bits) != count:
                raise StateError(f"state.irqs.{idx.name}: {len(masked)} vectors, this device "
                                 f"has {count}")
            vectors[idx] = (masked, pending_bits)
        state_dma_maps(r)  # checked, not applied
        fields = self._validate_fields(r.sub("fields")) if own else None
        return _StateImage(config, msix_image, irqs.flag("intx_level"), vectors, fields)

    def _check_config(self, config: bytes) -> None:
        """The config bytes must describe this function: same IDs, header and capability
        chain (the values the client programs are free)."""
        space = self.config.space
        fixed = [(0, 4), (8, 0x0C), (0x0E, 0x0F), (0x2C, 0x30), (0x34, 0x35), (0x3D, 0x3E)]
        for start, end in fixed:
            if config[start:end] != space.data[start:end]:
                raise StateError(f"config bytes {start:#x}..{end:#x} differ from this "
                                 "device's (another device or layout)")
        for cap in (*self.config.capabilities, *self.config.extended_capabilities):
            width = 2 if cap in self.config.capabilities else 4
            at = cap.offset
            if config[at:at + width] != space.data[at:at + width]:
                raise StateError(f"capability at {at:#x} differs from this device's")

    def _validate_fields(self, r: _state.Reader) -> dict[str, _state.StateValue]:
        try:
            return self._check_fields(r)
        except StateError as exc:
            raise _OwnStateError(str(exc)) from exc

    def _check_fields(self, r: _state.Reader) -> dict[str, _state.StateValue]:
        names = self.declared_state_fields()
        r.keys(*names)
        fields: dict[str, _state.StateValue] = {}
        cls_name = type(self).__name__
        for name in names:
            value = _state.decode_value(r.obj[name], f"{cls_name}.{name}")
            current = getattr(self, name)
            if not _same_kind(current, value):
                raise StateError(f"{cls_name}.{name}: the state has a "
                                 f"{type(value).__name__}, the device a "
                                 f"{type(current).__name__}")
            if isinstance(current, bytearray) and isinstance(value, bytes):
                value = bytearray(value)
            fields[name] = value
        try:
            self.check_state(fields)
        except StateError:
            raise
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise StateError(f"{cls_name}: {exc}") from exc
        return fields

    def _apply(self, image: _StateImage) -> None:
        """Make ``image`` the device's state (lock held, device quiesced)."""
        self.config.space.data[:] = image.config
        for cap in (*self.config.capabilities, *self.config.extended_capabilities):
            cap.state_restored()
        if self.msix is not None and image.msix is not None:
            table, pending, used = image.msix
            self.msix.table.restore(table, pending, enabled=self.msix.enabled,
                                    function_mask=self.msix.function_masked)
            self._msix_table_used = used
        self._intx_level = image.intx_level
        try:
            self.irqs.restore(level=image.intx_level,
                              intx_disabled=bool(self.config.command & COMMAND_INTX_DISABLE),
                              vectors=image.vectors)
        except IrqError as exc:
            raise StateError(str(exc)) from exc
        if image.fields is not None:
            for name, value in image.fields.items():
                setattr(self, name, value)
            self.state_loaded()

    # --- VfioDevice: what the server calls (final: authors override the hooks above) ---------
    def regions(self) -> Mapping[int, Region]:
        return self._regions

    @final
    def vfio_reset(self) -> None:
        with self.lock:
            self._reset_all()

    @final
    def vfio_attach(self, ctx: DeviceContext) -> None:
        self._ctx = ctx
        self.on_connect()

    @final
    def vfio_detach(self) -> None:
        self._ctx = None
        self.on_disconnect()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields = vars(cls).get("state_fields", ())
        if not isinstance(fields, tuple) or not all(
                isinstance(n, str) and n.isidentifier() for n in fields):
            raise DeviceDefinitionError(f"{cls.__name__}.state_fields must be a tuple of "
                                        "attribute names")
        version = cls.state_version
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise DeviceDefinitionError(f"{cls.__name__}.state_version must be an int >= 0")
        for name, hook in _SERVER_SIDE.items():
            if name in vars(cls):
                raise DeviceDefinitionError(
                    f"{cls.__name__}.{name}: the server calls it, a device does not define "
                    f"it; override {hook}() instead"
                )

    # --- internals --------------------------------------------------------------------------
    def _reset_all(self) -> None:
        self._intx_level = False
        self._msix_table_used = False
        self.config.reset()
        self.irqs.set_intx_disabled(False)
        self.reset()

    def _flr(self) -> None:
        log.info("%s: function-level reset", type(self).__name__)
        with self.lock:
            self._reset_all()

    def _command_written(self, offset: int, length: int, old: bytes) -> None:
        del offset, length, old
        self.irqs.set_intx_disabled(bool(self.config.command & COMMAND_INTX_DISABLE))

    def _msi_changed(self) -> None:
        msi = self.msi
        if msi is None:
            return
        for vector in range(msi.vectors):
            if not msi.is_masked(vector):
                self.irqs.vector_unmasked(IrqIndex.MSI, vector)

    def _msix_mask_changed(self, vector: int, masked: bool) -> None:
        if not masked:
            self.irqs.vector_unmasked(IrqIndex.MSIX, vector)

    def _vector_masked(self, index: int, vector: int) -> bool:
        if index == IrqIndex.MSI and self.msi is not None:
            return self.msi.per_vector_mask and self.msi.is_masked(vector)
        if index == IrqIndex.MSIX and self.msix is not None and self._msix_table_used:
            # QEMU emulates the MSI-X table itself and never writes ours: our mask bits only
            # count once a client has programmed the table through the BAR.
            return self.msix.is_masked(vector)
        return False

    def _vector_pending(self, index: int, vector: int, pending: bool) -> None:
        if index == IrqIndex.MSI and self.msi is not None and self.msi.per_vector_mask:
            self.msi.set_pending(vector, pending)
        elif index == IrqIndex.MSIX and self.msix is not None:
            self.msix.set_pending(vector, pending)

    def _build_regions(self) -> dict[int, Region]:
        regions: dict[int, Region] = {}
        self._mapped = MappedBars()
        for index in range(NUM_BARS):
            bar = self.config.bars[index]
            if bar is None:
                continue
            regions[index] = bar_region(self, index, bar.size, self._msix_table_written)
            if bar.mapped:  # shared memory in front of the trapped handlers
                self._mapped[index] = map_bar(index, bar, regions[index], self.msix)
        if self.rom is not None:
            image = self._rom_image
            regions[RegionIndex.ROM] = Region(
                len(image), read=lambda off, n: image[off:off + n], allow_short_read=True
            )
        regions[RegionIndex.CONFIG] = Region(self.config.size, read=self._config_read,
                                             write=self._config_write)
        return regions

    def _config_read(self, offset: int, count: int) -> bytes:
        with self.lock:
            return self.config.read(offset, count)

    def _config_write(self, offset: int, data: bytes) -> None:
        with self.lock:
            self.config.write(offset, data)

    def _msix_table_written(self) -> None:
        self._msix_table_used = True


class _OwnStateError(StateError):
    """The device's own part of a state is refused (its version, fields or values)."""


class _StateImage:
    """A validated state, ready to apply."""

    def __init__(self, config: bytes, msix: tuple[bytes, int, bool] | None, intx_level: bool,
                 vectors: dict[IrqIndex, tuple[list[bool], list[bool]]],
                 fields: dict[str, _state.StateValue] | None) -> None:
        self.config = config
        self.msix = msix
        self.intx_level = intx_level
        self.vectors = vectors
        self.fields = fields


def state_dma_maps(body: dict[str, Any] | _state.Reader | bytes) -> list[_state.DmaMapInfo]:
    """The DMA maps a state records (iova, size, prot, file offset, had an fd), checked.

    The fds are not in the state: a live upgrade passes them beside it and maps them again
    before it loads the state.
    """
    if isinstance(body, (bytes, bytearray, memoryview)):
        body = _state.decode(bytes(body))
    r = body if isinstance(body, _state.Reader) else _state.Reader(body, "state")
    maps = []
    for i, item in enumerate(r.items("dma_maps")):
        m = _state.Reader(item, f"state.dma_maps[{i}]").keys("iova", "size", "prot", "offset",
                                                             "fd")
        maps.append(_state.DmaMapInfo(m.integer("iova"), m.integer("size", 1),
                                      m.integer("prot", 0, 7), m.integer("offset"),
                                      m.flag("fd")))
    return maps


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _kind(value: object) -> type:
    for kind in (bool, int, str, list, dict):
        if isinstance(value, kind):
            return kind
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes
    if isinstance(value, tuple):
        return list
    return type(value)


def _same_kind(current: object, value: object) -> bool:
    """A loaded value may replace the current one: same kind, or either is None."""
    return current is None or value is None or _kind(current) is _kind(value)
