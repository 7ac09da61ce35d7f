"""What the guest modules share: the kernel command line, hot-plug ports, the agent scripts,
the device spec, the accelerator choice and the QMP client thread (see :mod:`.guest`)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfio_user_server.errors import GuestError, ProvisioningError
from vfio_user_server.testing.initramfs import (
    BOOT_MARKER,
)
from vfio_user_server.testing.provision import Provisioned

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
    from vfio_user_server.testing.guest import QemuMachine  # the guest kit builds on this module

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


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

