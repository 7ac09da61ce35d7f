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
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import ctypes
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfio_user_server.errors import GuestError, ProvisioningError
from vfio_user_server.testing import initramfs, snapshot
from vfio_user_server.testing.initramfs import (
    AGENT_BEGIN,
    AGENT_END,
    AGENT_READY,
    BOOT_MARKER,
    EXIT_MARKER,
    FileSource,
    build_initramfs,
)
from vfio_user_server.testing.provision import Provisioned, provision
from vfio_user_server.testing.snapshot import Template

__all__ = [
    "DEFAULT_CMDLINE",
    "QemuMachine",
    "Result",
    "VfioUserDevice",
    "kvm_usable",
    "select_accel",
]

log = logging.getLogger("vfio_user_server.testing.guest")

#: Initcalls of Debian's kernel that cost the most guest time under TCG and that no test needs
#: (jitter entropy, the X.509 certificate list (modules then load unverified, tainting the
#: kernel), BPF/crypto/trace self-setup). Measured: about 1 s of a 6-7 s boot.
SKIPPED_INITCALLS = (
    "jent_mod_init",
    "load_system_certificate_list",
    "bpf_tcp_ca_kfunc_init",
    "crypto_kdf108_init",
    "init_encrypted",
    "bpf_dummy_struct_ops_init",
    "trace_eval_init",
    "bpf_sockmap_iter_init",
)

#: Kernel command line. After ``rdinit=/init`` come boot-time savers measured under TCG:
#: no crypto self-tests, no CPU-bug mitigations, no i8042 probing, two UARTs only, skipped
#: initcalls, a quiet console (``verbose=True`` drops ``quiet``; ``dmesg`` in the guest has
#: everything anyway).
DEFAULT_CMDLINE = (
    "console=ttyS0 panic=-1 rdinit=/init mitigations=off cryptomgr.notests tsc=reliable "
    "no_timer_check 8250.nr_uarts=2 i8042.noaux i8042.nokbd "
    "initcall_blacklist=" + ",".join(SKIPPED_INITCALLS)
)

#: Root ports a restored guest has for its hot-plugged devices (more if it has more devices),
#: their QOM id prefix, and the most there can be (slots 0x10-0x1e of pcie.0).
DEFAULT_HOTPLUG_PORTS = 4
PORT_PREFIX = "pyvfio-rp"
MAX_HOTPLUG_PORTS = 15

#: The console line between the template's boot and what the restored guest prints.
RESTORE_MARKER = "PYVFIO-RESTORED"

#: Run by the agent right after a restore: the wall clock, host entropy (vmgenid already made
#: Linux reseed its RNG), then, for each root port with a device, wait until pciehp has
#: enumerated it and probed its driver: it turns the slot's power indicator on (Slot Control
#: bits 9:8 = 01b) only after that.
#: Prints the offset of the PCI Express capability of root port {port} (run in the template;
#: the offset is a property of QEMU's root port model, the same for every port).
EXP_CAP_SCRIPT = """\
d=/sys/bus/pci/devices/{port}
p=$(hexdump -s 52 -n 1 -e '1/1 "%u"' $d/config)
while [ "$p" -ne 0 ] && [ "$(hexdump -s $p -n 1 -e '1/1 "%u"' $d/config)" -ne 16 ]; do
    p=$(hexdump -s $((p + 1)) -n 1 -e '1/1 "%u"' $d/config)
done
[ "$p" -ne 0 ] && echo $p
"""

SETTLE_SCRIPT = """\
date -u -s @{now} >/dev/null || echo 'pyvfio: cannot set the clock'
echo {seed} | base64 -d > /dev/urandom
p={exp_cap}
for rp in {ports}; do
    d=/sys/bus/pci/devices/$rp
    until [ $(( ($(hexdump -s $((p + 24)) -n 2 -e '1/2 "%u"' $d/config) >> 8) & 3 )) -eq 1 ] \\
            && ls -d $d/0000:*:00.0 >/dev/null 2>&1; do
        sleep 0.02
    done
done
"""


def _port_bdf(index: int) -> str:
    """The guest's address of the kit's root port ``index`` (see :meth:`QemuMachine._argv`)."""
    return f"0000:00:{0x10 + index:02x}.0"


@dataclass(frozen=True)
class Result:
    """The outcome of a command run in the guest."""

    ok: bool
    status: int
    output: str
    command: str = ""
    duration: float = 0.0
    timed_out: bool = False

    def check(self) -> Result:
        """Return self, or raise :class:`GuestError` if the command failed."""
        if not self.ok:
            why = "timed out" if self.timed_out else f"exited with status {self.status}"
            raise GuestError(f"guest command {self.command!r} {why}; output:\n{self.output}")
        return self


@dataclass(frozen=True)
class VfioUserDevice:
    """A ``vfio-user-pci`` device: the server's UNIX socket plus optional QEMU properties."""

    socket: str
    id: str | None = None
    props: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self, default_id: str | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "driver": "vfio-user-pci",
            "socket": {"type": "unix", "path": str(self.socket)},
        }
        if self.id or default_id:
            spec["id"] = self.id or default_id
        spec.update(self.props)
        return spec


DeviceSpec = str | os.PathLike[str] | VfioUserDevice


def _as_device(spec: DeviceSpec) -> VfioUserDevice:
    if isinstance(spec, VfioUserDevice):
        return spec
    return VfioUserDevice(os.fspath(spec))


# --------------------------------------------------------------------------------------------
# Accelerator selection


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def kvm_usable(prov: Provisioned, *, timeout: float = 15.0) -> bool:
    """True when a guest really boots under KVM here (cached per host boot id).

    /dev/kvm being present is not enough (a kvm-pvm host kills Debian's kernel with an
    emulation failure), so this boots the provisioned kernel with KVM until its marker.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    cache_file = prov.cache_dir / "kvm-probe.json"
    key = {
        "boot_id": _boot_id(),
        "qemu": prov.qemu.version,
        "qemu_binary": str(prov.qemu.binary),
        "kernel": prov.kernel.release,
        "image": str(prov.kernel.image),
    }
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(cache_file.read_text())
        if isinstance(cached, dict) and cached.get("key") == key:
            return bool(cached.get("ok"))
    ok = False
    detail = ""
    try:
        with QemuMachine(
            prov,
            accel="kvm",
            agent=False,
            test_script="true",
            boot_timeout=timeout,
            memory_mib=256,
            shared_memory=False,
            keep_workdir=False,
            name="kvm-probe",
        ) as probe:
            probe.wait_exit(timeout=timeout)
            ok = BOOT_MARKER in probe.console_text()
            detail = probe.console_text()[-2000:]
    except (GuestError, ProvisioningError, OSError) as exc:
        detail = str(exc)[-2000:]
    log.info("KVM probe: %s", "guest booted" if ok else "guest did not boot")
    with contextlib.suppress(OSError):
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "ok": ok, "detail": detail}, indent=2))
        os.replace(tmp, cache_file)
    return ok


def select_accel(prov: Provisioned, accel: str | None = None) -> str:
    """``"tcg"`` or ``"kvm"`` for ``accel`` in (None/``"auto"``, ``"tcg"``, ``"kvm"``)."""
    choice = (accel or os.environ.get("PYVFIO_ACCEL") or "auto").lower()
    if choice in ("tcg", "kvm"):
        return choice
    if choice != "auto":
        raise GuestError(f"unknown accelerator {choice!r} (tcg, kvm or auto)")
    return "kvm" if kvm_usable(prov) else "tcg"


# --------------------------------------------------------------------------------------------
# QMP in its own event loop thread


class _Qmp:
    """A ``qemu.qmp`` client driven by a private asyncio loop in a daemon thread."""

    def __init__(self, name: str) -> None:
        from qemu.qmp import QMPClient

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp-{name}", daemon=True
        )
        self._thread.start()
        self._client = QMPClient(name)

    def _call(self, coro: Any, timeout: float) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def connect(self, path: str, timeout: float) -> None:
        self._call(self._client.connect(path), timeout)

    def execute(self, cmd: str, args: Mapping[str, Any] | None = None, timeout: float = 30) -> Any:
        return self._call(self._client.execute(cmd, dict(args) if args else None), timeout)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._call(self._client.disconnect(), 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()


# --------------------------------------------------------------------------------------------
# The machine

_live: weakref.WeakSet[QemuMachine] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for machine in list(_live):
        with contextlib.suppress(Exception):
            machine.close()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class QemuMachine:
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
        self._collect: dict[int, list[str]] = {}
        self._next_id = 0
        self._send_lock = threading.Lock()
        self._agent_eof = False
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

    # ---------------------------------------------------------------- paths

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

    # ---------------------------------------------------------------- start

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
            # Native PCIe hot-plug (pciehp), not QEMU's ACPI hot-plug of q35's root ports:
            # pciehp tells when a device is ready (see SETTLE_SCRIPT).
            argv += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
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

    def _listen_agent(self) -> None:
        if self.agent:
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(str(self._path("agent.sock")))
            self._listener.listen(1)

    def _start_agent_reader(self, deadline: float) -> None:
        assert self._listener is not None
        self._agent_sock = self._accept(self._listener, deadline)
        self._reader = threading.Thread(
            target=self._read_agent, name=f"agent-{self.name}", daemon=True
        )
        self._reader.start()

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

    # ---------------------------------------------------------------- template snapshots

    def _template_inputs(self) -> dict[str, Any]:
        """Everything that decides what a template snapshot holds (see :mod:`.snapshot`)."""
        assert self.prov is not None
        prov = self.prov
        argv = self._argv(Path("@WORKDIR"), Path("@INITRD"), "pyvfio-template", devices=False)
        files: dict[str, Any] = {}
        for path, src in sorted(self.files.items()):
            if isinstance(src, tuple):
                data, mode = src
            elif isinstance(src, bytes):
                data, mode = src, 0o644
            else:
                data, mode = Path(src).read_bytes(), Path(src).stat().st_mode & 0o7777
            files[path.lstrip("/")] = [hashlib.sha256(data).hexdigest(), mode]
        return {
            "argv": argv,
            "qemu": [prov.qemu.version, *snapshot.file_identity(prov.qemu.binary)],
            "kernel": [prov.kernel.release, *snapshot.file_identity(prov.kernel_image)],
            "initramfs": {
                "builder": hashlib.sha256(Path(initramfs.__file__).read_bytes()).hexdigest(),
                "busybox": snapshot.file_identity(prov.busybox),
                "modules_dir": os.fspath(prov.modules_dir),
                "modules": self.modules,
                "module_params": self.module_params,
                "files": files,
            },
        }

    def _make_template(self, folder: Path) -> dict[str, Any]:
        """Boot the template guest cold, stop it and save it into ``folder``."""
        assert self.prov is not None
        boot = QemuMachine(
            self.prov,
            modules=self.modules,
            module_params=self.module_params,
            files=self.files,
            memory_mib=self.memory_mib,
            smp=self.smp,
            accel=self.accel,
            shared_memory=self.shared_memory,
            iommu=self.iommu,
            verbose=self.verbose,
            cmdline=self.cmdline,
            extra_args=self.extra_args,
            no_reboot=self.no_reboot,
            boot_timeout=self.boot_timeout,
            keep_workdir=False,
            name="pyvfio-template",
            die_with_parent=self.die_with_parent,
            cold_boot=True,
            hotplug_ports=self._port_count(),
        )
        boot._is_template = True
        with boot:
            want = self._argv(boot.workdir or folder, boot._path("initramfs.cpio.gz"),
                              "pyvfio-template", devices=False)
            if boot.qemu_argv() != want:  # pragma: no cover - a bug in this module
                raise GuestError("the template's command line is not the one restores use")
            exp_cap = int(boot.run(EXP_CAP_SCRIPT.format(port=_port_bdf(0)), timeout=60,
                                   check=True).output)
            boot.qmp("stop")
            boot.qmp("migrate-set-capabilities",
                     capabilities=[{"capability": "mapped-ram", "state": True}])
            t0 = time.monotonic()
            boot.qmp("migrate", uri=f"file:{folder / 'ram'}")
            boot._wait_migration(time.monotonic() + self.boot_timeout, "saving the template")
            saved = time.monotonic() - t0
            shutil.copyfile(boot._path("initramfs.cpio.gz"), folder / "initramfs.cpio.gz")
            shutil.copyfile(boot.console_log, folder / "console.log")
            boot_time = boot.boot_time
        st = os.stat(folder / "ram")
        return {
            "exp_cap": exp_cap,
            "boot_time": boot_time,
            "save_time": saved,
            "ram_file_bytes": st.st_size,
            "ram_disk_bytes": st.st_blocks * 512,
        }

    def _wait_migration(self, deadline: float, doing: str) -> None:
        while True:
            self._check_alive(doing)
            info = self.qmp("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise self._error(f"migration {status} while {doing}: "
                                  f"{info.get('error-desc', '')}")
            if time.monotonic() > deadline:
                raise self._error(f"migration did not finish while {doing}")
            time.sleep(0.01)

    def _restore(self) -> None:
        """Start from the template snapshot (made first if missing), hot-plug the devices."""
        assert self.prov is not None
        self.restored = True
        inputs = self._template_inputs()
        key = snapshot.key_of(inputs)
        folder = snapshot.cache_folder(self.prov.cache_dir)
        template, made = snapshot.get_or_create(
            folder, key, lambda tmp: {**self._make_template(tmp), "inputs": inputs},
            timeout=3 * self.boot_timeout,
        )
        self.template = template
        self.template_made = made
        self.ports = [f"{PORT_PREFIX}{i}" for i in range(self._port_count())]
        # The template's boot console first, so the console log tells the whole story.
        with open(self.console_log, "wb") as out:
            with contextlib.suppress(OSError):
                out.write(template.console_log.read_bytes())
            out.write(f"\n{RESTORE_MARKER} {key}\n".encode())
        self._listen_agent()
        argv = self._argv(self.workdir or Path(), template.initramfs, self.name,
                          devices=False, console_append=True)
        t0 = self._spawn([*argv, "-incoming", "defer"], f" restored-from={key}")
        deadline = t0 + self.boot_timeout
        self._start_agent_reader(deadline)
        self._connect_qmp(deadline)
        try:
            self.qmp("migrate-set-capabilities",
                     capabilities=[{"capability": "mapped-ram", "state": True}])
            self.qmp("migrate-incoming", uri=f"file:{template.ram}")
            self._wait_migration(deadline, "restoring the template snapshot")
        except GuestError:
            template.discard()
            raise
        except Exception as exc:
            template.discard()
            raise self._error(f"cannot restore the template snapshot {template.folder}: "
                              f"{exc}") from exc
        loaded = time.monotonic() - t0
        if self.qmp("query-status").get("status") != "running":
            self.qmp("cont")
        for dev in list(self.devices):
            self._plug(dev)
        self._settle(deadline)
        self.boot_time = time.monotonic() - t0
        msg = (
            f"guest {self.name!r} restored in {self.boot_time:.2f} s "
            f"(snapshot loaded in {loaded:.2f} s, {len(self.devices)} device(s) hot-plugged; "
            f"template {key}{' made now' if made else ''}; accel={self.accel}, QEMU "
            f"{self.prov.qemu.version})"
        )
        log.info(msg)
        print(f"pyvfio-user: {msg}", file=sys.stderr, flush=True)

    def _plug(self, dev: VfioUserDevice, port: str | None = None) -> str:
        """``device_add`` ``dev`` into a free root port; returns the device id."""
        if "bus" in dev.props:
            spec = dev.to_json(self._new_device_id())
            self.qmp("device_add", spec)
            return str(spec["id"])
        if port is None:
            free = [p for p in self.ports if p not in self._port_users]
            if not free:
                raise GuestError(f"no free PCIe root port for hot-plug (ports {self.ports})")
            port = free[0]
        spec = {**dev.to_json(self._new_device_id()), "bus": port}
        self.qmp("device_add", spec)
        self._port_users[port] = str(spec["id"])
        return str(spec["id"])

    def _settle(self, deadline: float) -> None:
        """One agent command: set the clock, add host entropy, wait for the hot-plugged
        devices to be enumerated with their drivers probed (pciehp turns the slot's power
        indicator on only after that)."""
        assert self.template is not None
        ports = [p for p in self.ports if p in self._port_users]
        bdfs = " ".join(_port_bdf(int(p[len(PORT_PREFIX):])) for p in ports)
        seed = base64.b64encode(os.urandom(64)).decode()
        exp_cap = int(self.template.meta()["exp_cap"])
        script = SETTLE_SCRIPT.format(now=int(time.time()), seed=seed, ports=bdfs,
                                      exp_cap=exp_cap)
        left = max(1.0, deadline - time.monotonic())
        result = self.run(script, timeout=left)
        if not result.ok:
            dmesg = self.run("dmesg | tail -40", timeout=30).output
            raise self._error(f"the hot-plugged devices did not come up:\n{result.output}\n"
                              f"--- guest dmesg ---\n{dmesg}")

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
            time.sleep(0.05)

    # ---------------------------------------------------------------- agent

    def _read_agent(self) -> None:
        assert self._agent_sock is not None
        buf = b""
        sock = self._agent_sock
        with open(self._path("agent.log"), "ab") as alog:
            while True:
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    with self._cond:
                        self._agent_eof = True
                        self._cond.notify_all()
                    return
                alog.write(chunk)
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    self._agent_line(raw.decode(errors="replace").strip("\r"))

    def _agent_line(self, line: str) -> None:
        with self._cond:
            if line.endswith(AGENT_READY):
                self._ready_count += 1
                self._collect.clear()
                self._cond.notify_all()
                return
            m = re.match(rf"^{AGENT_BEGIN} (\d+)$", line)
            if m:
                self._collect[int(m.group(1))] = []
                return
            m = re.match(rf"^{AGENT_END} (\d+) (-?\d+)$", line)
            if m:
                cid = int(m.group(1))
                parts = self._collect.pop(cid, [])
                try:
                    data = base64.b64decode("".join(parts))
                except ValueError:
                    data = ("".join(parts)).encode()
                self._results[cid] = (int(m.group(2)), data)
                self._cond.notify_all()
                return
            for parts in self._collect.values():
                parts.append(line.strip())

    def _wait_ready(self, count: int, deadline: float) -> None:
        with self._cond:
            while self._ready_count < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._error("the guest agent did not come up in time")
                if self._agent_eof:
                    raise self._error("the agent serial port closed before the guest was ready")
                self._cond.wait(min(remaining, 0.25))
                if self._cond_check_dead():
                    raise self._error("QEMU exited before the guest was ready")

    def _cond_check_dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def _send(self, line: str) -> None:
        if self._agent_sock is None:
            raise GuestError("this guest has no command agent (agent=False)")
        with self._send_lock:
            self._agent_sock.sendall(line.encode() + b"\n")

    def run(self, command: str, timeout: float = 60.0, *, check: bool = False) -> Result:
        """Run ``command`` with ``sh`` in the guest; stdout and stderr come back merged.

        The guest kills the command after ``timeout`` seconds (``Result.timed_out``); a guest
        that does not answer within ``timeout`` plus a margin raises :class:`GuestError`.
        """
        if self.proc is None or self._closed:
            raise GuestError("guest is not running")
        with self._cond:
            self._next_id += 1
            cid = self._next_id
        guest_timeout = max(1, math.ceil(timeout)) if timeout > 0 else 0
        payload = base64.b64encode(command.encode()).decode()
        t0 = time.monotonic()
        self._send(f"{cid} {guest_timeout} {payload}")
        deadline = t0 + (timeout if timeout > 0 else 1e9) + 30
        with self._cond:
            while cid not in self._results:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._error(f"no answer from the guest agent to {command!r}")
                if self._agent_eof or self._cond_check_dead():
                    raise self._error(f"the guest went away while running {command!r}")
                self._cond.wait(min(remaining, 0.25))
            status, data = self._results.pop(cid)
        duration = time.monotonic() - t0
        timed_out = timeout > 0 and status == 137 and duration >= guest_timeout - 0.5
        result = Result(
            ok=status == 0,
            status=status,
            output=data.decode(errors="replace"),
            command=command,
            duration=duration,
            timed_out=timed_out,
        )
        return result.check() if check else result

    def reboot(self, *, timeout: float | None = None, via: str = "guest") -> float:
        """Reboot the guest (``reboot -f`` in it, or QMP ``system_reset`` with ``via="qmp"``)
        and wait until the agent is back; return the seconds it took. Needs ``no_reboot=False``.
        """
        if self.no_reboot:
            raise GuestError("reboot() needs QemuMachine(no_reboot=False)")
        with self._cond:
            target = self._ready_count + 1
        t0 = time.monotonic()
        if via == "qmp":
            self.qmp("system_reset")
        else:
            with self._cond:
                self._next_id += 1
                cid = self._next_id
            payload = base64.b64encode(b"sync; reboot -f").decode()
            self._send(f"{cid} 0 {payload}")
        self._wait_ready(target, t0 + (timeout or self.boot_timeout))
        return time.monotonic() - t0

    # ---------------------------------------------------------------- QMP, devices

    def qmp(self, command: str, args: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """Run a QMP command and return its result (raises ``qemu.qmp.ExecuteError``)."""
        if self._qmp is None:
            raise GuestError("QMP is not connected")
        merged = {**(args or {}), **kwargs}
        return self._qmp.execute(command, merged or None)

    def attach(self, device: DeviceSpec) -> str:
        """Hot-plug a vfio-user device through QMP ``device_add``; returns its id.

        Without a ``bus`` property it goes into a free root port of the kit's (restored guests
        have :data:`DEFAULT_HOTPLUG_PORTS`; ``hotplug_ports=N`` gives a cold-booted one some).
        This returns when QEMU has realized the device; the guest finds it a moment later.
        """
        dev = _as_device(device)
        if self.ports or "bus" in dev.props:
            dev_id = self._plug(dev)
        else:
            spec = dev.to_json(self._new_device_id())
            self.qmp("device_add", spec)
            dev_id = str(spec["id"])
        self.devices.append(dev)
        return dev_id

    def detach(self, device_id: str) -> None:
        """Ask for the guest-cooperative unplug of a device (QMP ``device_del``).

        QEMU 11.1.3 aborts on the unplug of a vfio-user device with MSI-X
        (docs/qemu-issues.md); teardown never unplugs, it ends QEMU.
        """
        self.qmp("device_del", id=device_id)
        for port, user in list(self._port_users.items()):
            if user == device_id:
                del self._port_users[port]

    # ---------------------------------------------------------------- console

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

    # ---------------------------------------------------------------- errors and teardown

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

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and not self._closed

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
