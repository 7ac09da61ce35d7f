"""Boot a Linux guest under QEMU, attach vfio-user devices, and run commands in it.

:class:`QemuMachine` starts QEMU with:

* ``-machine q35`` under TCG (``-cpu max``), or KVM (``-cpu host``) only when a probe boot of
  the same kernel reached its marker under KVM on this boot of the host (cached per boot id
  in the provisioning cache). ``$PYVFIO_ACCEL`` (``tcg``, ``kvm``, ``auto``) overrides;
* guest RAM from ``memory-backend-memfd,share=on`` by default (so a vfio-user server gets fds
  for DMA), or plain RAM with no fd (``shared_memory=False``);
* the console (COM1, ``ttyS0``) streamed to ``console.log`` in the work folder, the command
  agent on COM2 (``ttyS1``) through a UNIX socket, a QMP socket (``qemu.qmp``);
* each vfio-user socket as ``-device '{"driver":"vfio-user-pci","socket":{...}}'``.

Commands run through the agent: ``guest.run("cmd", timeout=...) -> Result(ok, status,
output)``. Everything (QEMU's process group, sockets, threads, the work folder) is torn down by
:meth:`QemuMachine.close`, the context manager, or at interpreter exit.

:class:`QemuMachine` is built in layers, one module each: :mod:`.guest_base` (constants, the
device spec, the accelerator choice, the QMP thread), :mod:`.guest_process` (settings, command
line, process, QMP, console, errors), :mod:`.guest_agent` (the command agent),
:mod:`.guest_restore` (template snapshots, hot-plug) and this module (start and teardown).
Every public name is importable from here.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vfio_user_server.errors import GuestError
from vfio_user_server.testing.guest_base import (
    DEFAULT_CMDLINE,
    DEFAULT_HOTPLUG_PORTS,
    MAX_HOTPLUG_PORTS,
    PORT_PREFIX,
    RESTORE_MARKER,
    SKIPPED_INITCALLS,
    DeviceSpec,
    Result,
    VfioUserDevice,
    kvm_usable,
    select_accel,
)
from vfio_user_server.testing.guest_restore import _GuestRestore
from vfio_user_server.testing.initramfs import BOOT_MARKER
from vfio_user_server.testing.provision import provision

__all__ = [
    "DEFAULT_CMDLINE",
    "DEFAULT_HOTPLUG_PORTS",
    "MAX_HOTPLUG_PORTS",
    "PORT_PREFIX",
    "RESTORE_MARKER",
    "SKIPPED_INITCALLS",
    "DeviceSpec",
    "GuestFactory",
    "QemuMachine",
    "Result",
    "VfioUserDevice",
    "kvm_usable",
    "select_accel",
]

log = logging.getLogger("vfio_user_server.testing.guest")


_live: weakref.WeakSet[QemuMachine] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for machine in list(_live):
        with contextlib.suppress(Exception):
            machine.close()


class QemuMachine(_GuestRestore):
    """A QEMU guest with the busybox initramfs, vfio-user devices and the command agent.

    Use as a context manager, or call :meth:`start` and :meth:`close`. All arguments are
    keywords except ``prov`` (the result of :func:`~vfio_user_server.testing.provision
    .provision`, provisioned when None).

    * ``sockets``: vfio-user server sockets (paths or :class:`VfioUserDevice`), attached at
      start as ``vfu0``, ``vfu1``, ... (:meth:`attach` hot-plugs more);
    * ``modules`` / ``module_params``: kernel modules loaded by /init (dependencies too);
    * ``files``: extra files for the initramfs (see :func:`build_initramfs`);
    * ``test_script`` / ``agent``: a script /init runs (then powers off; see
      :meth:`wait_exit`), and/or the command agent for :meth:`run` (default on);
    * ``memory_mib``, ``smp``; ``accel`` (None/"auto", "tcg", "kvm");
    * ``shared_memory``: guest RAM from a shared memfd (the server gets DMA fds) or plain RAM;
    * ``iommu``: an emulated Intel IOMMU (``intremap=on,caching-mode=on``) and
      ``intel_iommu=on``, so that the guest's vfio-pci works (Debian's kernel has no VFIO
      no-IOMMU mode); with ``vfio-pci`` in ``modules`` this also loads ``vfio_iommu_type1``;
    * ``verbose``: full kernel log on the console (default ``$PYVFIO_GUEST_VERBOSE``);
    * ``cmdline``: appended to :data:`DEFAULT_CMDLINE`; ``extra_args``: appended to QEMU's;
    * ``no_reboot``: QEMU exits when the guest reboots; ``False`` allows :meth:`reboot`;
    * ``workdir`` / ``keep_workdir``: logs and sockets (a temporary folder by default, kept
      only when something failed);
    * ``die_with_parent``: QEMU gets SIGKILL when the thread that started it exits.
    """

    def _wants_restore(self) -> bool:
        """Whether :meth:`start` restores a template snapshot (else it boots cold)."""
        cold = self.cold_boot
        if cold is None:
            cold = os.environ.get("PYVFIO_COLD_BOOT", "") not in ("", "0")
        if cold:
            return False
        why = None
        if not self.agent:
            why = "agent=False"
        elif self.test_script is not None:
            why = "a test_script (it runs at boot)"
        elif len(self.devices) > MAX_HOTPLUG_PORTS or (self.hotplug_ports or 0) > MAX_HOTPLUG_PORTS:
            why = f"more than {MAX_HOTPLUG_PORTS} devices"
        if why is None:
            return True
        if self.cold_boot is False:
            raise GuestError(f"cold_boot=False is not possible with {why}")
        return False

    def start(self) -> QemuMachine:
        """Start QEMU and wait until the guest is ready: restored from a template snapshot
        with the devices hot-plugged (the default), or booted cold with them present."""
        if self.proc is not None:
            raise GuestError("guest already started")
        if self.prov is None:
            self.prov = provision()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="pyvfio-guest-"))
        else:
            self.workdir.mkdir(parents=True, exist_ok=True)
        _live.add(self)
        try:
            self.accel = select_accel(self.prov, self.requested_accel)
            if self._wants_restore():
                self._restore()
            else:
                self._start()
        except BaseException:
            self._failed = True
            self.close()
            raise
        return self

    def _start(self) -> None:
        assert self.prov is not None
        prov = self.prov
        self._build_initramfs(self._path("initramfs.cpio.gz"))
        self.ports = [f"{PORT_PREFIX}{i}" for i in range(self._port_count())]
        self._listen_agent()
        t0 = self._spawn(self.qemu_argv(), "")
        deadline = t0 + self.boot_timeout
        if self.agent:
            self._start_agent_reader(deadline)
        self._connect_qmp(deadline)
        if self.agent:
            self._wait_ready(1, deadline)
        else:
            self.wait_for_console(BOOT_MARKER, timeout=max(0.0, deadline - time.monotonic()))
        self.boot_time = time.monotonic() - t0
        msg = (
            f"guest {self.name!r} booted in {self.boot_time:.2f} s "
            f"(accel={self.accel}, kernel {prov.kernel.release} "
            f"{prov.kernel_image.name}, QEMU {prov.qemu.version})"
        )
        log.info(msg)
        print(f"pyvfio-user: {msg}", file=sys.stderr, flush=True)

    def close(self, timeout: float = 5.0) -> None:
        """Stop QEMU (QMP quit, then SIGTERM/SIGKILL to its process group) and clean up."""
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        proc = self.proc
        if proc is not None and proc.poll() is None and self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.execute("quit", timeout=2)
        if proc is not None:
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout if sig is None else 3)
                    break
                except subprocess.TimeoutExpired:
                    continue
            # Anything left in QEMU's process group (helpers) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._qmp is not None:
            self._qmp.close()
        for sock in (self._agent_sock, self._listener):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
        if self._reader is not None:
            self._reader.join(timeout=5)
        keep = self.keep_workdir if self.keep_workdir is not None else self._failed
        if self._own_workdir and self.workdir is not None and not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> QemuMachine:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._failed = True
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self.close()


#: A callable that makes a started guest, for fixtures: ``factory(**overrides) -> QemuMachine``.
GuestFactory = Callable[..., QemuMachine]
