"""The QEMU process of a guest: its settings, command line, work folder, QMP socket, console
and errors (the lowest layer of :class:`~vfio_user_server.testing.guest.QemuMachine`)."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vfio_user_server.errors import GuestError
from vfio_user_server.testing.guest_base import (
    DEFAULT_CMDLINE,
    DEFAULT_HOTPLUG_PORTS,
    PORT_PREFIX,
    DeviceSpec,
    _as_device,
    _die_with_parent,
    _Qmp,
)
from vfio_user_server.testing.initramfs import (
    EXIT_MARKER,
    FileSource,
    build_initramfs,
)
from vfio_user_server.testing.provision import Provisioned
from vfio_user_server.testing.snapshot import Template

log = logging.getLogger("vfio_user_server.testing.guest")


class _GuestProcess:
    """QEMU for one guest: settings (see :class:`~vfio_user_server.testing.guest.QemuMachine`),
    command line, process, QMP, console and errors."""

    def __init__(
        self,
        prov: Provisioned | None = None,
        *,
        sockets: Sequence[DeviceSpec] = (),
        modules: Sequence[str] = (),
        module_params: Mapping[str, str] | None = None,
        files: Mapping[str, FileSource] | None = None,
        test_script: str | None = None,
        agent: bool = True,
        memory_mib: int = 512,
        smp: int = 1,
        accel: str | None = None,
        shared_memory: bool = True,
        iommu: bool = False,
        verbose: bool | None = None,
        cmdline: str = "",
        extra_args: Sequence[str] = (),
        no_reboot: bool = True,
        boot_timeout: float = 180.0,
        workdir: str | os.PathLike[str] | None = None,
        keep_workdir: bool | None = None,
        name: str = "guest",
        die_with_parent: bool = True,
        cold_boot: bool | None = None,
        hotplug_ports: int | None = None,
    ) -> None:
        self.prov = prov
        self.devices = [_as_device(s) for s in sockets]
        self.modules = list(modules)
        self.module_params = dict(module_params or {})
        names = {m.replace("-", "_") for m in self.modules}
        if iommu and "vfio_pci" in names and "vfio_iommu_type1" not in names:
            # vfio-pci with the emulated IOMMU needs the type1 backend, which the kernel
            # would load on demand (there is no modprobe here).
            self.modules.append("vfio_iommu_type1")
        self.files = dict(files or {})
        self.test_script = test_script
        self.agent = agent
        self.memory_mib = memory_mib
        self.smp = smp
        self.requested_accel = accel
        self.shared_memory = shared_memory
        self.iommu = iommu
        if verbose is None:
            verbose = os.environ.get("PYVFIO_GUEST_VERBOSE", "") not in ("", "0")
        self.verbose = verbose
        self.cmdline = cmdline
        self.extra_args = list(extra_args)
        self.no_reboot = no_reboot
        self.boot_timeout = boot_timeout
        self.name = name
        self.die_with_parent = die_with_parent
        self.cold_boot = cold_boot
        self.hotplug_ports = hotplug_ports
        self.keep_workdir = keep_workdir
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        #: "tcg" or "kvm" once started.
        self.accel: str | None = None
        #: Seconds from starting QEMU to the boot marker (agent ready) of the first boot.
        self.boot_time: float | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: _Qmp | None = None
        self._listener: socket.socket | None = None
        self._agent_sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._ready_count = 0
        self._results: dict[int, tuple[int, bytes]] = {}
        self._next_id = 0
        self._send_lock = threading.Lock()
        self._agent_eof = False
        #: The machine whose state the agent reader updates (another one after an adoption).
        self._agent_owner: _GuestProcess = self
        self._failed = False
        self._closed = False
        self._device_counter = 0
        #: True once started from a template snapshot (False: booted cold).
        self.restored = False
        #: The template snapshot this guest was restored from, and whether this start made it.
        self.template: Template | None = None
        self.template_made = False
        #: Root ports (QOM ids) this machine has for hot-plug, and the devices placed in them.
        self.ports: list[str] = []
        self._port_users: dict[str, str] = {}
        #: Builds the template's command line (vmgenid, root ports, no devices).
        self._is_template = False

    def _path(self, name: str) -> Path:
        assert self.workdir is not None
        return self.workdir / name

    @property
    def console_log(self) -> Path:
        return self._path("console.log")

    @property
    def qemu_log(self) -> Path:
        return self._path("qemu.log")

    @property
    def qmp_socket(self) -> Path:
        return self._path("qmp.sock")

    def qemu_argv(self) -> list[str]:
        """The full QEMU command line (valid after the initramfs is built in :meth:`start`)."""
        assert self.workdir is not None
        return self._argv(self.workdir, self._path("initramfs.cpio.gz"), self.name)

    def _argv(
        self,
        workdir: Path,
        initrd: Path,
        name: str,
        *,
        devices: bool = True,
        console_append: bool = False,
    ) -> list[str]:
        assert self.prov is not None and self.accel is not None
        prov = self.prov
        mem = f"{self.memory_mib}M"
        machine = f"q35,accel={self.accel}"
        argv = [*prov.qemu_argv_prefix, "-name", name, "-nodefaults", "-display", "none"]
        if self.shared_memory:
            argv += [
                "-object",
                f"memory-backend-memfd,id=mem,size={mem},share=on",
            ]
            machine += ",memory-backend=mem"
        if self.iommu and self.accel == "kvm":
            machine += ",kernel-irqchip=split"
        argv += ["-machine", machine, "-m", mem, "-smp", str(self.smp)]
        argv += ["-cpu", "host" if self.accel == "kvm" else "max"]
        if self.no_reboot:
            argv.append("-no-reboot")
        cmdline = DEFAULT_CMDLINE
        if not self.verbose:
            cmdline += " quiet"
        if self.iommu:
            # caching-mode=on: QEMU's VFIO code (vfio-user-pci too) needs to see every IOMMU
            # map the guest makes. Interrupt remapping: vfio_iommu_type1 refuses to work
            # without it, and multi-vector MSI needs it (KVM then needs a split irqchip).
            argv += ["-device", "intel-iommu,intremap=on,caching-mode=on"]
            cmdline += " intel_iommu=on"
        if self.cmdline:
            cmdline += " " + self.cmdline
        console = f"file,id=console,path={workdir / 'console.log'}"
        if console_append:
            console += ",append=on"
        argv += [
            "-kernel",
            str(prov.kernel_image),
            "-initrd",
            str(initrd),
            "-append",
            cmdline,
            "-chardev",
            console,
            "-serial",
            "chardev:console",
        ]
        if self.agent:
            argv += [
                "-chardev",
                f"socket,id=agent,path={workdir / 'agent.sock'}",
                "-serial",
                "chardev:agent",
            ]
        argv += ["-qmp", f"unix:{workdir / 'qmp.sock'},server=on,wait=off"]
        if self._port_count():
            # QEMU's ACPI hot-plug of q35's root ports (its default, said here as the kit
            # relies on it): the guest's acpiphp adds a device and ejects it on device_del,
            # and a plugged slot is powered, so the kit's rescan (pyvfio-settle) finds the
            # device at once. Native hot-plug would make the kit wait for pciehp's link delays.
            argv += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=on"]
        for port in range(self._port_count()):
            # Fixed addresses (0x10...) and chassis numbers (200...), clear of what tests add.
            argv += ["-device", f"pcie-root-port,id={PORT_PREFIX}{port},bus=pcie.0,"
                     f"addr={0x10 + port:#x},chassis={200 + port},slot=1,io-reserve=4K"]
        if self._is_template or self.restored:
            # A fresh VM generation id on every restore: Linux reseeds its RNG at once.
            argv += ["-device", "vmgenid,id=pyvfio-vmgenid,guid=auto"]
        if devices:
            for dev in self.devices:
                argv += ["-device", json.dumps(dev.to_json(self._new_device_id()))]
        argv += self.extra_args
        return argv

    def _new_device_id(self) -> str:
        self._device_counter += 1
        return f"vfu{self._device_counter - 1}"

    def _port_count(self) -> int:
        if self.hotplug_ports is not None:
            return self.hotplug_ports
        if self._is_template or self.restored:
            return max(DEFAULT_HOTPLUG_PORTS, len(self.devices))
        return 0

    def _build_initramfs(self, dest: Path) -> None:
        assert self.prov is not None
        prov = self.prov
        initrd = build_initramfs(
            prov.busybox,
            modules_dir=prov.modules_dir,
            modules=self.modules,
            module_params=self.module_params,
            test_script=self.test_script,
            agent_port="/dev/ttyS1" if self.agent else None,
            files=self.files,
        )
        dest.write_bytes(initrd)

    def _spawn(self, argv: list[str], note: str) -> float:
        """Start QEMU with ``argv`` (its output to qemu.log); return the start time."""
        self._path("qemu-argv.json").write_text(json.dumps(argv, indent=1))
        with open(self.qemu_log, "wb") as qlog:
            qlog.write(f"# accel={self.accel}{note}\n# {json.dumps(argv)}\n".encode())
            qlog.flush()
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=qlog,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        self._started_at = t0
        return t0

    def _accept(self, listener: socket.socket, deadline: float) -> socket.socket:
        listener.settimeout(0.2)
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                self._check_alive("waiting for QEMU to connect the agent serial port")
                if time.monotonic() > deadline:
                    raise self._error("QEMU did not connect the agent serial port") from None
                continue
            conn.settimeout(None)
            return conn

    def _connect_qmp(self, deadline: float) -> None:
        qmp = _Qmp(self.name)
        self._qmp = qmp
        while True:
            self._check_alive("connecting to QMP")
            if self.qmp_socket.exists():
                try:
                    qmp.connect(str(self.qmp_socket), timeout=10)
                    return
                except Exception as exc:  # ConnectError, OSError
                    if time.monotonic() > deadline:
                        raise self._error(f"cannot connect to QMP: {exc}") from exc
            if time.monotonic() > deadline:
                raise self._error("QEMU never created its QMP socket")
            time.sleep(0.005)  # QEMU makes it within ~50 ms of its start: do not overshoot

    def qmp(self, command: str, args: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """Run a QMP command and return its result (raises ``qemu.qmp.ExecuteError``)."""
        if self._qmp is None:
            raise GuestError("QMP is not connected")
        merged = {**(args or {}), **kwargs}
        return self._qmp.execute(command, merged or None)

    def _tail(self, path: Path, n: int = 40) -> str:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            return "(none)"
        return "\n".join(lines[-n:]) or "(empty)"

    def _error(self, message: str) -> GuestError:
        self._failed = True
        status = self.proc.poll() if self.proc is not None else None
        state = "running" if status is None else f"exited with status {status}"
        return GuestError(
            f"{message} (guest {self.name!r}, accel={self.accel}, QEMU {state}, "
            f"work folder {self.workdir})\n"
            f"--- console (last lines) ---\n{self._tail(self.console_log)}\n"
            f"--- qemu log ---\n{self._tail(self.qemu_log, 20)}"
        )

    def _check_alive(self, doing: str) -> None:
        if self._cond_check_dead():
            raise self._error(f"QEMU exited while {doing}")

    def _cond_check_dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and not self._closed

    def wait_exit(self, timeout: float = 120.0) -> int | None:
        """Wait for QEMU to exit; return the test script's status from the console, if any."""
        if self.proc is None:
            raise GuestError("guest is not running")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._error(f"QEMU did not exit within {timeout} s") from None
        m = re.search(rf"{EXIT_MARKER} (\d+)", self.console_text())
        return int(m.group(1)) if m else None

    def console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""

    def wait_for_console(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """Wait until the console log matches the regex ``pattern``."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.console_text())
            if m:
                return m
            if self._cond_check_dead():
                m = rx.search(self.console_text())
                if m:
                    return m
                raise self._error(f"QEMU exited before the console showed {pattern!r}")
            if time.monotonic() > deadline:
                raise self._error(f"the console did not show {pattern!r} in {timeout} s")
            time.sleep(0.05)
