"""Device servers and a guest together: what the pytest plugin and the launcher run.

:class:`Guest` starts one :class:`~vfio_user_server.server.Server` per device (in this
process, each in its own thread, so a test can look at the device's Python state), starts a
:class:`~vfio_user_server.testing.guest.QemuMachine` (its ``machine``) attached to their
sockets, and tears both down on exit, whatever happened::

    with Guest(["gpio-pci-idio-16"], modules=["gpio-pci-idio-16"]) as g:
        assert g.run("ls /sys/bus/gpio/devices").ok
        print(g.device.outputs)

The machine is restored from a template snapshot with the devices hot-plugged (about a
second) unless ``cold_boot=True`` or ``$PYVFIO_COLD_BOOT=1`` (see
:mod:`vfio_user_server.testing.snapshot`). Names: the pytest fixture ``guest`` is a
:class:`Guest`; ``guest.machine`` is its :class:`QemuMachine`. ``DeviceGuest`` is the old
name of :class:`Guest`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..cli import make_device
from ..endpoint import VfioDevice
from ..errors import GuestError
from ..protocol.constants import DmaLayout
from ..server import Server
from .guest import QemuMachine, Result
from .initramfs import FileSource
from .provision import Provisioned, provision

log = logging.getLogger(__name__)

#: A device given by name ("edu", "module:Class"), class, or instance.
DeviceLike = str | type[VfioDevice] | VfioDevice


def instantiate(spec: DeviceLike, args: Sequence[str] = ()) -> VfioDevice:
    if isinstance(spec, VfioDevice):
        return spec
    if isinstance(spec, str):
        return make_device(spec, args)
    return spec()


class Guest:
    """Servers for ``devices`` plus a guest machine attached to them.

    ``cold_boot``: None (default) restores a template snapshot and hot-plugs the devices
    unless ``$PYVFIO_COLD_BOOT`` is set; True boots QEMU with the devices present at power-on
    (option ROMs, firmware enumeration, the golden trace). The other keywords go to
    :class:`~vfio_user_server.testing.guest.QemuMachine`.
    """

    def __init__(
        self,
        devices: Sequence[DeviceLike],
        *,
        prov: Provisioned | None = None,
        trace: bool | Callable[[str], None] = False,
        dma_layout: DmaLayout = DmaLayout.AUTO,
        workdir: str | Path | None = None,
        modules: Sequence[str] = (),
        module_params: Mapping[str, str] | None = None,
        files: Mapping[str, FileSource] | None = None,
        shared_memory: bool = True,
        memory_mib: int = 512,
        cmdline: str = "",
        no_reboot: bool = True,
        boot: bool = True,
        cold_boot: bool | None = None,
        **machine_kwargs: Any,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="pyvfio-"))
        self.devices: list[VfioDevice] = [instantiate(d) for d in devices]
        self.servers: list[Server] = []
        self.trace_lines: list[str] = []
        self._trace = trace
        self._dma_layout = dma_layout
        self.machine: QemuMachine | None = None
        self._machine_kwargs = dict(
            modules=modules,
            module_params=module_params,
            files=files,
            shared_memory=shared_memory,
            memory_mib=memory_mib,
            cmdline=cmdline,
            no_reboot=no_reboot,
            cold_boot=cold_boot,
            **machine_kwargs,
        )
        self._prov = prov
        self._boot = boot

    # --- conveniences -------------------------------------------------------------------------
    @property
    def device(self) -> VfioDevice:
        """The first (usually the only) device."""
        return self.devices[0]

    @property
    def server(self) -> Server:
        return self.servers[0]

    @property
    def started_machine(self) -> QemuMachine:
        """:attr:`machine`, or :class:`GuestError` if it is not started."""
        if self.machine is None:
            raise GuestError("the guest is not started")
        return self.machine

    #: Old name of :attr:`started_machine`.
    guest = started_machine

    def run(self, command: str, timeout: float = 60.0, *, check: bool = False) -> Result:
        """Run ``command`` in the guest (see :meth:`QemuMachine.run`)."""
        return self.started_machine.run(command, timeout, check=check)

    def socket_path(self, index: int = 0) -> Path:
        return self.workdir / f"dev{index}.sock"

    # --- lifetime -----------------------------------------------------------------------------
    def _trace_sink(self, index: int) -> Callable[[str], None] | bool:
        if self._trace is False:
            return False
        user = self._trace if callable(self._trace) else None

        def sink(line: str) -> None:
            tagged = f"dev{index} {line}" if len(self.devices) > 1 else line
            self.trace_lines.append(tagged)
            if user is not None:
                user(tagged)

        return sink

    def start(self) -> Guest:
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            for i, dev in enumerate(self.devices):
                srv = Server(dev, self.socket_path(i), trace=self._trace_sink(i),
                             dma_layout=self._dma_layout)
                self.servers.append(srv.start())
            if self._boot:
                self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def boot(self) -> QemuMachine:
        """Start the guest (done by :meth:`start` unless ``boot=False``)."""
        prov = self._prov or provision()
        self.machine = QemuMachine(
            prov,
            sockets=[str(self.socket_path(i)) for i in range(len(self.devices))],
            workdir=self.workdir / "guest",
            **self._machine_kwargs,
        )
        self.machine.start()
        return self.machine

    def close(self) -> None:
        """Stop the guest, then the servers; remove the work folder unless it was given."""
        if self.machine is not None:
            with contextlib.suppress(Exception):
                self.machine.close()
        for srv in self.servers:
            try:
                srv.close()
            except Exception:
                log.exception("closing server %s", srv.path)
        self.servers.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


#: The old name of :class:`Guest`.
DeviceGuest = Guest
