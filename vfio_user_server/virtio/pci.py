"""The virtio-pci modern transport (virtio 1.x, 4.1) as a :class:`~..device.PciDevice`.

A virtio device author subclasses :class:`VirtioPciDevice`, names the device type, its
feature bits, its queues and its configuration, and handles requests::

    class Rng(VirtioPciDevice):
        virtio_device_id = DeviceId.ENTROPY
        num_queues = 1

        def process_queue(self, vq):          # worker thread
            while (chain := vq.pop()) is not None:
                vq.push(chain, chain.write(os.urandom(chain.writable_length)))

The transport does the rest, as Linux's ``virtio_pci`` expects it:

* identity 1af4:(1040 + device ID), revision 1 (modern only: no legacy I/O BAR);
* BAR1: the MSI-X table (at 0) and PBA (at 0x800); BAR4 (64-bit, 16 KiB) holds the virtio
  structures, each announced by a vendor-specific capability (``cfg_type``)::

      BAR4 0x0000  common configuration (0x40 bytes)   cfg_type 1
           0x1000  ISR status (1 byte, read clears)     cfg_type 3
           0x2000  device configuration                 cfg_type 4
           0x3000  notifications, queue q at 0x3000+4q  cfg_type 2 (multiplier 4)

  plus the PCI configuration access capability (cfg_type 5), a window onto the BARs through
  config space (a device without configuration, ``config_size`` 0, has no cfg_type 4);
* feature negotiation: VIRTIO_F_VERSION_1 is offered and required (a driver that does not
  accept it never gets FEATURES_OK), with INDIRECT_DESC, EVENT_IDX, RING_PACKED if
  ``ring_packed`` is set (split rings otherwise) and the device's bits;
* device status, and reset by writing 0 (status reads non-zero until the worker has
  stopped touching guest memory, so the driver's wait for 0 is meaningful);
* interrupts: MSI-X with a config vector and per-queue vectors (a vector outside the table
  reads back as NO_VECTOR), else INTx, level-triggered, with the ISR register;
* notifications: a trapped write to the notify area marks the queue; the connection's worker
  thread runs :meth:`VirtioPciDevice.process_queue` (so message DMA works), then publishes
  used entries and interrupts as the driver's suppression asks (a device with ``inline`` set
  has requests in fd-backed memory run right in the notify write, on the loop thread);
* a malformed ring or an unmapped address (:class:`~.virtqueue.VirtqueueError`) sets
  DEVICE_NEEDS_RESET and raises the configuration interrupt; the queues then stand still
  until the driver resets the device.

Lock discipline: register handlers run on the loop thread with :attr:`lock` held; the worker
takes it only to pick work and to raise interrupts, never while touching guest memory (message
DMA under the lock would deadlock with the loop thread).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import ClassVar

from ..device import PciDevice
from ..errors import DeviceDefinitionError, DmaError
from ..irq import IrqIndex
from ..pci import Bar, Capability
from ..pci.config import Field
from .packed import PackedVirtqueue
from .spec import (
    COMMON_CFG_SIZE,
    COMMON_CFG_SIZES,
    DEVICE_FEATURE_MASK,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_RING_PACKED,
    F_VERSION_1,
    ISR_CONFIG,
    ISR_QUEUE,
    NO_VECTOR,
    VIRTIO_PCI_MODERN_DEVICE_BASE,
    VIRTIO_PCI_MODERN_REVISION,
    VIRTIO_PCI_VENDOR_ID,
    CfgType,
    CommonCfg,
    Status,
    bit,
)
from .virtqueue import NeedsWorker, Virtqueue, VirtqueueError

__all__ = ["VirtioPciCap", "VirtioPciCfgCap", "VirtioPciDevice", "VirtioPciNotifyCap"]

log = logging.getLogger(__name__)

#: The BAR that holds the virtio structures, and where each one is.
VIRTIO_BAR = 4
VIRTIO_BAR_SIZE = 0x4000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
NOTIFY_MULTIPLIER = 4
STRUCTURE_SIZE = 0x1000
#: The BAR of the MSI-X table and PBA.
MSIX_BAR = 1

_COMMON = struct.Struct("<IIIIHHBBHHHHHQQQHHHH")
assert _COMMON.size == COMMON_CFG_SIZE


class VirtioPciCap(Capability):
    """A virtio PCI capability (vendor-specific, ID 0x09) locating one structure in a BAR.

    ::

         31        24 23        16 15         8 7          0
        +------------+------------+------------+------------+
        |  cfg_type  |  cap_len   |    next    |    0x09    |  +0x00
        +------------+------------+------------+------------+
        |        padding          |     id     |    bar     |  +0x04
        +-------------------------+------------+------------+
        |  offset (in the BAR)                              |  +0x08
        +---------------------------------------------------+
        |  length                                           |  +0x0C
        +---------------------------------------------------+
    """

    cap_id = 0x09
    FIELDS = (
        *Capability.HEADER,
        #     name        offset size
        Field("cap_len",  0x02,  1),
        Field("cfg_type", 0x03,  1),
        Field("bar",      0x04,  1),
        Field("id",       0x05,  1),
        Field("padding",  0x06,  2),
        Field("offset",   0x08,  4),
        Field("length",   0x0C,  4),
    )  # fmt: skip

    def __init__(self, cfg_type: CfgType, bar: int, offset: int, length: int) -> None:
        super().__init__()
        self.cfg_type = cfg_type
        self.bar = bar
        self.bar_offset = offset
        self.bar_length = length

    def initial_values(self) -> dict[str, int]:
        return {**super().initial_values(), "cap_len": self.length,
                "cfg_type": int(self.cfg_type), "bar": self.bar, "offset": self.bar_offset,
                "length": self.bar_length}


class VirtioPciNotifyCap(VirtioPciCap):
    """The notification capability: a virtio PCI capability plus ``notify_off_multiplier``
    at +0x10 (queue q is notified at ``offset + queue_notify_off(q) * multiplier``)."""

    FIELDS = (*VirtioPciCap.FIELDS, Field("notify_off_multiplier", 0x10, 4))

    def __init__(self, bar: int, offset: int, length: int, multiplier: int) -> None:
        super().__init__(CfgType.NOTIFY, bar, offset, length)
        self.multiplier = multiplier

    def initial_values(self) -> dict[str, int]:
        return {**super().initial_values(), "notify_off_multiplier": self.multiplier}


class VirtioPciCfgCap(VirtioPciCap):
    """The PCI configuration access capability: ``bar``, ``offset`` and ``length`` (1, 2 or
    4) are written by the driver, then ``pci_cfg_data`` at +0x10 reads or writes that window
    of the BAR (for firmware that cannot map BARs). ``on_read(bar, offset, size) -> int`` and
    ``on_write(bar, offset, size, value)`` are set by the device."""

    FIELDS = (
        *Capability.HEADER,
        #     name            offset size  wmask
        Field("cap_len",      0x02,  1),
        Field("cfg_type",     0x03,  1),
        Field("bar",          0x04,  1,    0xFF),
        Field("id",           0x05,  1),
        Field("padding",      0x06,  2),
        Field("offset",       0x08,  4,    0xFFFFFFFF),
        Field("length",       0x0C,  4,    0xFFFFFFFF),
        Field("pci_cfg_data", 0x10,  4,    0xFFFFFFFF),
    )  # fmt: skip

    def __init__(self) -> None:
        super().__init__(CfgType.PCI, 0, 0, 0)
        self.on_read: Callable[[int, int, int], int] | None = None
        self.on_write: Callable[[int, int, int, int], None] | None = None

    def attach(self) -> None:
        start = self.offset + 0x10
        self.space.on_read(start, start + 4, self._data_read)
        self._hook("pci_cfg_data", self._data_written)

    def _window(self) -> tuple[int, int, int] | None:
        bar, offset, size = self.get("bar"), self.get("offset"), self.get("length")
        if size not in (1, 2, 4) or offset % size:
            return None
        return bar, offset, size

    def _data_read(self, offset: int, length: int) -> None:
        window = self._window()
        value = 0
        if window is not None and self.on_read is not None:
            value = int(self.on_read(*window)) & ((1 << 8 * window[2]) - 1)
        self.set("pci_cfg_data", value)

    def _data_written(self, offset: int, length: int, old: bytes) -> None:
        window = self._window()
        if window is not None and self.on_write is not None:
            bar, off, size = window
            self.on_write(bar, off, size, self.get("pci_cfg_data") & ((1 << 8 * size) - 1))


class VirtioPciDevice(PciDevice):
    """Base class of virtio devices on the modern virtio-pci transport (module docstring)."""

    vendor_id = VIRTIO_PCI_VENDOR_ID
    subsystem_vendor_id = VIRTIO_PCI_VENDOR_ID
    revision = VIRTIO_PCI_MODERN_REVISION
    interrupt_pin = 1
    bars: ClassVar = {MSIX_BAR: Bar(0x1000),
                      VIRTIO_BAR: Bar(VIRTIO_BAR_SIZE, kind="mem64", prefetchable=True)}
    msix_bar = MSIX_BAR
    msix_table_offset = 0
    msix_pba_offset = 0x800
    #: MSI-X vectors: one for configuration changes and one per queue by default.
    msix_vectors = 2
    guest_modules: ClassVar[tuple[str, ...]] = ("virtio_pci",)

    # --- what a virtio device declares ----------------------------------------------------------
    #: The virtio device ID (5): the PCI device ID is 0x1040 plus this.
    virtio_device_id: ClassVar[int]
    #: Device-specific feature bits offered (bits 0..23); may be set per instance before
    #: ``super().__init__()``.
    device_features: int = 0
    #: Number of virtqueues, and the largest size of each (a power of two).
    num_queues: int = 1
    queue_size: int = 256
    #: Bytes of device configuration (0x2000 in BAR4).
    config_size: int = 0
    #: Offer VIRTIO_F_RING_PACKED (the driver then chooses the packed ring layout).
    ring_packed: bool = False
    #: May :meth:`process_queue` run on the loop thread, right in the notify write, when the
    #: worker is idle? Only for handlers that touch guest memory through the chain and the
    #: DMA layer (no threads of their own) and whose work is short (a file read or write is
    #: fine). Requests in memory without fds are still handed to the worker. Off by default:
    #: it measured slower before the queues cached their windows onto guest RAM, level or
    #: faster since, with a wide spread on a loaded machine (BENCHMARKS.md).
    inline: bool = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "virtio_device_id" in cls.__dict__ and "device_id" not in cls.__dict__:
            cls.device_id = VIRTIO_PCI_MODERN_DEVICE_BASE + cls.virtio_device_id

    def __init__(self) -> None:
        if not hasattr(type(self), "virtio_device_id"):
            raise DeviceDefinitionError(f"{type(self).__name__} needs virtio_device_id")
        if self.device_features & ~DEVICE_FEATURE_MASK:
            raise DeviceDefinitionError("device_features may only use bits 0..23")
        if not 1 <= self.num_queues <= STRUCTURE_SIZE // NOTIFY_MULTIPLIER:
            raise DeviceDefinitionError(f"num_queues {self.num_queues} out of range")
        if not 0 <= self.config_size <= STRUCTURE_SIZE:
            raise DeviceDefinitionError(f"config_size {self.config_size} out of range")
        #: Every feature bit offered to the driver.
        self.offered_features = (bit(F_VERSION_1) | bit(F_RING_INDIRECT_DESC)
                                 | bit(F_RING_EVENT_IDX) | self.device_features
                                 | (bit(F_RING_PACKED) if self.ring_packed else 0))
        self._cfg_cap = VirtioPciCfgCap()
        self._gen = 0
        self._draining = False
        self._quiescing = False
        self._quiesce_status = 0
        self.config_generation = 0
        self._virtio_state()
        super().__init__()
        self._cfg_cap.on_read = self._bar_read_locked
        self._cfg_cap.on_write = self._bar_write_locked

    # --- hooks for virtio device authors ---------------------------------------------------------
    def process_queue(self, vq: Virtqueue) -> None:
        """Handle what the driver made available on ``vq`` (worker thread, lock not held):
        ``vq.pop()`` until None, ``vq.push(chain, written)`` for each. Raise
        :class:`~.virtqueue.VirtqueueError` for a request that breaks the rules."""
        del vq

    def virtio_config(self) -> bytes:
        """The device configuration (``config_size`` bytes; shorter is padded with zeros)."""
        return b""

    def virtio_config_write(self, offset: int, data: bytes) -> None:
        """The driver wrote device configuration at ``offset`` (ignored by default)."""
        del offset, data

    def features_ok(self, features: int) -> bool:
        """May the device work with the ``features`` the driver accepted?"""
        del features
        return True

    def driver_ok(self) -> None:
        """The driver set DRIVER_OK (loop thread, lock held)."""

    def virtio_reset(self) -> None:
        """Device-specific state back to its reset value (lock held)."""

    # --- services -------------------------------------------------------------------------------
    def has_feature(self, feature_bit: int) -> bool:
        """Was feature ``feature_bit`` negotiated?"""
        return bool(self.driver_features >> feature_bit & 1)

    @property
    def status(self) -> int:
        return self._status

    @property
    def queues(self) -> list[Virtqueue]:
        return self._queues

    @property
    def isr(self) -> int:
        return self._isr

    def config_changed(self) -> None:
        """The device configuration changed: new generation and a configuration interrupt."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
            self._config_interrupt()

    def needs_reset(self, reason: str) -> None:
        """Something went wrong that only a reset recovers from (lock held or not)."""
        with self.lock:
            if self._status & Status.DEVICE_NEEDS_RESET:
                return
            log.warning("%s: device needs reset: %s", type(self).__name__, reason)
            self._status |= Status.DEVICE_NEEDS_RESET
            self._config_interrupt()

    def state_lost(self, reason: str) -> None:
        """A reload could not carry the device's state: DEVICE_NEEDS_RESET and a
        configuration interrupt."""
        self.needs_reset(f"its state was not carried: {reason}")

    def kick(self, index: int) -> None:
        """Process queue ``index`` as if the driver had notified it (lock held)."""
        self._notify(index)

    # --- state ----------------------------------------------------------------------------------
    def _virtio_state(self) -> None:
        self._status = 0
        self.driver_features = 0
        self._device_feature_select = 0
        self._driver_feature_select = 0
        self._queue_select = 0
        self.config_vector = NO_VECTOR
        self._isr = 0
        self._queues = [Virtqueue(i, self.queue_size) for i in range(self.num_queues)]

    def reset(self) -> None:
        """DEVICE_RESET, FLR and the driver's status write of 0."""
        self._virtio_reset()

    def _virtio_reset(self) -> None:
        with self.lock:
            if self._draining and not self._quiescing:
                # the worker may still touch guest memory for the old queues
                self._quiescing = True
                self._quiesce_status = self._status or Status.ACKNOWLEDGE
            for vq in self._queues:
                vq.dead = True
            self._gen += 1
            self._virtio_state()
            if self.intx_level:
                self.set_intx(False)
            self.virtio_reset()

    def on_disconnect(self) -> None:
        # the rings are in memory that is gone; the worker has stopped already
        self._virtio_reset()
        with self.lock:
            self._draining = False
            self._quiescing = False

    # --- BAR access -----------------------------------------------------------------------------
    def capabilities(self) -> list[Capability]:
        caps: list[Capability] = [
            VirtioPciCap(CfgType.COMMON, VIRTIO_BAR, COMMON_OFFSET, COMMON_CFG_SIZE),
            VirtioPciNotifyCap(VIRTIO_BAR, NOTIFY_OFFSET, NOTIFY_MULTIPLIER * self.num_queues,
                               NOTIFY_MULTIPLIER),
            VirtioPciCap(CfgType.ISR, VIRTIO_BAR, ISR_OFFSET, 1),
        ]
        if self.config_size:
            # optional, and Linux refuses a device structure of length 0
            caps.append(VirtioPciCap(CfgType.DEVICE, VIRTIO_BAR, DEVICE_OFFSET,
                                     self.config_size))
        caps.append(self._cfg_cap)
        return caps

    def _bar_read_locked(self, bar: int, offset: int, size: int) -> int:
        with self.lock:
            return self.bar_read(bar, offset, size)

    def _bar_write_locked(self, bar: int, offset: int, size: int, value: int) -> None:
        with self.lock:
            self.bar_write(bar, offset, size, value)

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if bar != VIRTIO_BAR:
            return 0
        if offset >= NOTIFY_OFFSET:
            return 0
        if offset >= DEVICE_OFFSET:
            rel = offset - DEVICE_OFFSET
            if rel + size > self.config_size:
                return 0
            cfg = self.virtio_config().ljust(self.config_size, b"\0")
            return int.from_bytes(cfg[rel:rel + size], "little")
        if offset >= ISR_OFFSET:
            if offset != ISR_OFFSET:
                return 0
            value = self._isr
            self._isr = 0
            if self.intx_level:
                self.set_intx(False)
            return value
        if offset + size > COMMON_CFG_SIZE:
            return 0
        return int.from_bytes(self._common_bytes()[offset:offset + size], "little")

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != VIRTIO_BAR:
            return
        if offset >= NOTIFY_OFFSET:
            rel = offset - NOTIFY_OFFSET
            if rel % NOTIFY_MULTIPLIER == 0 and size >= 2:
                self._notify(rel // NOTIFY_MULTIPLIER)
            return
        if offset >= DEVICE_OFFSET:
            rel = offset - DEVICE_OFFSET
            if rel + size <= self.config_size:
                self.virtio_config_write(rel, value.to_bytes(size, "little"))
            return
        if offset >= ISR_OFFSET:
            return  # ISR is read-only
        self._common_write(offset, size, value)

    # --- common configuration -------------------------------------------------------------------
    def _selected(self) -> Virtqueue | None:
        sel = self._queue_select
        return self._queues[sel] if sel < len(self._queues) else None

    def _common_bytes(self) -> bytes:
        sel = self._device_feature_select
        device_feature = (self.offered_features >> 32 * sel) & 0xFFFFFFFF if sel < 2 else 0
        sel = self._driver_feature_select
        driver_feature = (self.driver_features >> 32 * sel) & 0xFFFFFFFF if sel < 2 else 0
        vq = self._selected()
        status = self._quiesce_status if self._quiescing else self._status
        if vq is None:
            queue = (0, NO_VECTOR, 0, 0, 0, 0, 0)
        else:
            queue = (vq.size, vq.vector, int(vq.enabled), vq.index, vq.desc, vq.driver,
                     vq.device)
        return _COMMON.pack(
            self._device_feature_select, device_feature, self._driver_feature_select,
            driver_feature, self.config_vector, len(self._queues), status,
            self.config_generation, self._queue_select, *queue,
            vq.index if vq is not None else 0, 0, 0, 0)

    def _vector_ok(self, vector: int) -> int:
        return vector if vector == NO_VECTOR or vector < self.msix_vectors else NO_VECTOR

    def _common_write(self, offset: int, size: int, value: int) -> None:
        field = offset & ~7 if offset >= CommonCfg.QUEUE_DESC and offset < 0x38 else offset
        field_size = COMMON_CFG_SIZES.get(field)
        if field_size is None or (size != field_size and not (
                field_size == 8 and size == 4 and offset in (field, field + 4))):
            log.debug("virtio: ignoring a %d-byte write at common config %#x", size, offset)
            return
        vq = self._selected()
        if field == CommonCfg.DEVICE_FEATURE_SELECT:
            self._device_feature_select = value
        elif field == CommonCfg.DRIVER_FEATURE_SELECT:
            self._driver_feature_select = value
        elif field == CommonCfg.DRIVER_FEATURE:
            sel = self._driver_feature_select
            if sel < 2 and not self._status & Status.FEATURES_OK:
                mask = 0xFFFFFFFF << 32 * sel
                self.driver_features = (self.driver_features & ~mask) | (value << 32 * sel)
        elif field == CommonCfg.CONFIG_MSIX_VECTOR:
            self.config_vector = self._vector_ok(value)
        elif field == CommonCfg.DEVICE_STATUS:
            self._write_status(value)
        elif field == CommonCfg.QUEUE_SELECT:
            self._queue_select = value
        elif vq is None:
            return
        elif field == CommonCfg.QUEUE_SIZE:
            if not vq.enabled:
                vq.size = value
        elif field == CommonCfg.QUEUE_MSIX_VECTOR:
            vq.vector = self._vector_ok(value)
        elif field == CommonCfg.QUEUE_ENABLE:
            if value == 1 and not vq.enabled:
                self._enable_queue(vq)
        elif field in (CommonCfg.QUEUE_DESC, CommonCfg.QUEUE_DRIVER, CommonCfg.QUEUE_DEVICE):
            if vq.enabled:
                return
            name = {CommonCfg.QUEUE_DESC: "desc", CommonCfg.QUEUE_DRIVER: "driver",
                    CommonCfg.QUEUE_DEVICE: "device"}[CommonCfg(field)]
            old = getattr(vq, name)
            if size == 8:
                new = value
            else:
                shift = 8 * (offset - field)
                new = (old & ~(0xFFFFFFFF << shift)) | value << shift
            setattr(vq, name, new)

    def _enable_queue(self, vq: Virtqueue) -> None:
        if self.has_feature(F_RING_PACKED):
            vq = PackedVirtqueue.configured_like(vq)
            self._queues[vq.index] = vq
        problem = vq.check_config()
        if problem is not None:
            self.needs_reset(problem)
            return
        try:
            dma = self.dma
        except DmaError:
            self.needs_reset("queue enabled with no client connected")
            return
        vq.start(dma, event_idx=self.has_feature(F_RING_EVENT_IDX),
                 indirect=self.has_feature(F_RING_INDIRECT_DESC))

    def _write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self._virtio_reset()
            return
        old = self._status
        new = old | value
        if new & Status.FEATURES_OK and not old & Status.FEATURES_OK:
            accepted = self.driver_features
            if (accepted & ~self.offered_features or not accepted >> F_VERSION_1 & 1
                    or not self.features_ok(accepted)):
                log.info("%s: features %#x refused", type(self).__name__, accepted)
                new &= ~Status.FEATURES_OK
        if new & Status.DRIVER_OK and not old & Status.DRIVER_OK:
            if not new & Status.FEATURES_OK:
                log.info("%s: DRIVER_OK without FEATURES_OK ignored", type(self).__name__)
                new &= ~Status.DRIVER_OK
            else:
                self._status = new
                self.driver_ok()
                for vq in self._queues:
                    if vq.enabled:
                        self._notify(vq.index)  # buffers made available before DRIVER_OK
                return
        self._status = new

    # --- notifications and the worker -----------------------------------------------------------
    def _notify(self, index: int) -> None:
        if index >= len(self._queues):
            return
        vq = self._queues[index]
        status = self._status
        if (not vq.enabled or not status & Status.DRIVER_OK
                or status & Status.DEVICE_NEEDS_RESET):
            return
        vq.kicked = True
        if self._draining:
            return  # the worker looks for kicked queues before it stops
        if self.inline and self._service_inline(vq):
            return
        try:
            self.defer(self._drain)
        except DmaError:
            return
        self._draining = True

    def _service_inline(self, vq: Virtqueue) -> bool:
        """Run the queue here, on the loop thread (lock held, worker idle); True if done,
        False if something needs message DMA (it is then left, unconsumed, to the worker)."""
        # the rings must be fd-backed all through: after a request is consumed, nothing may
        # need the worker any more
        if vq.dma is None or not vq.rings_direct():
            return False
        vq.kicked = False
        vq.inline = True
        try:
            self._service(vq, self._gen)
        except NeedsWorker:
            vq.kicked = True
            return False
        finally:
            vq.inline = False
        return True

    def _drain(self) -> None:
        """Worker thread: service kicked queues until none is left."""
        while True:
            with self.lock:
                vq = next((q for q in self._queues if q.kicked), None)
                if vq is None:
                    self._draining = False
                    self._quiescing = False
                    return
                vq.kicked = False
                gen = self._gen
            self._service(vq, gen)

    def _service(self, vq: Virtqueue, gen: int) -> None:
        idle = 0
        try:
            while True:
                vq.suppress_notifications()
                before = vq.popped
                self.process_queue(vq)
                if vq.dead:
                    return
                # requests that arrive from here on notify again; those that came while
                # notifications were off are found by the check, and processed in one more
                # round (unless the device twice left them where they are: then it waits for
                # the next notification, or its own kick())
                more = vq.enable_notifications()
                if vq.needs_interrupt():
                    with self.lock:
                        if gen == self._gen:
                            self._queue_interrupt(vq)
                idle = idle + 1 if vq.popped == before else 0
                if not more or idle >= 2:
                    return
        except NeedsWorker:
            raise
        except (VirtqueueError, DmaError) as exc:
            with self.lock:
                if gen == self._gen and not vq.dead:
                    self.needs_reset(str(exc))
        except Exception:
            log.exception("%s: queue %d handler failed", type(self).__name__, vq.index)
            with self.lock:
                if gen == self._gen and not vq.dead:
                    self.needs_reset(f"queue {vq.index} handler failed")

    # --- interrupts (lock held) -----------------------------------------------------------------
    def _msix_on(self) -> bool:
        return self.msix is not None and self.msix.enabled

    def _queue_interrupt(self, vq: Virtqueue) -> None:
        if self._msix_on():
            if vq.vector != NO_VECTOR:
                self.irqs.trigger(IrqIndex.MSIX, vq.vector)
            return
        self._isr |= ISR_QUEUE
        self.set_intx(True)

    def _config_interrupt(self) -> None:
        if self._msix_on():
            if self.config_vector != NO_VECTOR:
                self.irqs.trigger(IrqIndex.MSIX, self.config_vector)
            return
        self._isr |= ISR_CONFIG
        self.set_intx(True)
