"""Template snapshots and hot-plug for a guest: make or restore the template, plug and settle
devices, :meth:`attach` / :meth:`detach` (a layer of
:class:`~vfio_user_server.testing.guest.QemuMachine`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vfio_user_server.errors import GuestError
from vfio_user_server.testing import initramfs, snapshot
from vfio_user_server.testing.guest_agent import _GuestAgent
from vfio_user_server.testing.guest_base import (
    PORT_PREFIX,
    RESTORE_MARKER,
    DeviceSpec,
    VfioUserDevice,
    _as_device,
    _port_bdf,
)
from vfio_user_server.testing.standby import POOL

log = logging.getLogger("vfio_user_server.testing.guest")


class _GuestRestore(_GuestAgent):
    """Restores a template snapshot and hot-plugs the devices; attach and detach later."""

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

    def _settings(self) -> dict[str, Any]:
        """The settings a guest with this setup but no device is made with (the template,
        a standby)."""
        return {
            "modules": self.modules, "module_params": self.module_params, "files": self.files,
            "memory_mib": self.memory_mib, "smp": self.smp, "accel": self.accel,
            "shared_memory": self.shared_memory, "iommu": self.iommu, "verbose": self.verbose,
            "cmdline": self.cmdline, "extra_args": self.extra_args, "no_reboot": self.no_reboot,
            "boot_timeout": self.boot_timeout, "keep_workdir": False,
            "die_with_parent": self.die_with_parent, "hotplug_ports": self._port_count(),
        }

    def _make_template(self, folder: Path) -> dict[str, Any]:
        """Boot the template guest cold, stop it and save it into ``folder``."""
        from vfio_user_server.testing.guest import QemuMachine  # the class this is a layer of

        assert self.prov is not None
        boot = QemuMachine(self.prov, name="pyvfio-template", cold_boot=True,
                           **self._settings())
        boot._is_template = True
        with boot:
            want = self._argv(boot.workdir or folder, boot._path("initramfs.cpio.gz"),
                              "pyvfio-template", devices=False)
            if boot.qemu_argv() != want:  # pragma: no cover - a bug in this module
                raise GuestError("the template's command line is not the one restores use")
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

    def _template(self) -> tuple[snapshot.Template, bool]:
        """The template snapshot of this setup (made first if missing) and whether made now."""
        assert self.prov is not None
        inputs = self._template_inputs()
        key = snapshot.key_of(inputs)
        folder = snapshot.cache_folder(self.prov.cache_dir)
        return snapshot.get_or_create(
            folder, key, lambda tmp: {**self._make_template(tmp), "inputs": inputs},
            timeout=3 * self.boot_timeout,
        )

    def _standby_key(self, template: snapshot.Template) -> str:
        """What a standby must share with this guest: its command line but for the work
        folder and the name, and whether QEMU dies with its parent."""
        argv = self._argv(Path("@WORKDIR"), template.initramfs, "@NAME", devices=False,
                          console_append=True)
        return json.dumps([argv, self.die_with_parent])

    def _launch(self, template: snapshot.Template) -> float:
        """Start QEMU paused on the template snapshot (loaded when this returns); returns
        QEMU's start time."""
        self.restored = True
        self.template = template
        self.ports = [f"{PORT_PREFIX}{i}" for i in range(self._port_count())]
        # The template's boot console first, so the console log tells the whole story.
        with open(self.console_log, "wb") as out:
            with contextlib.suppress(OSError):
                out.write(template.console_log.read_bytes())
            out.write(f"\n{RESTORE_MARKER} {template.key}\n".encode())
        self._listen_agent()
        argv = self._argv(self.workdir or Path(), template.initramfs, self.name,
                          devices=False, console_append=True)
        t0 = self._spawn([*argv, "-incoming", "defer", "-S"], f" restored-from={template.key}")
        deadline = t0 + self.boot_timeout
        self._start_agent_reader(deadline)
        self._connect_qmp(deadline)
        try:
            self.qmp("migrate-set-capabilities",
                     capabilities=[{"capability": "mapped-ram", "state": True}])
            self.qmp("migrate-incoming", uri=f"file:{template.ram}")
            self._wait_migration(deadline, "restoring the template snapshot")
        except GuestError:
            if not self._closed:  # closed under it (a standby at exit): the file is fine
                template.discard()
            raise
        except Exception as exc:
            if not self._closed:
                template.discard()
            raise self._error(f"cannot restore the template snapshot {template.folder}: "
                              f"{exc}") from exc
        return t0

    def _start_standby(self, template: snapshot.Template) -> None:
        """Start as a standby (see :mod:`.standby`): restored, resumed, one warm-up command."""
        from vfio_user_server.testing.guest import _live  # the class this is a layer of

        assert self.workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="pyvfio-standby-"))
        _live.add(self)  # type: ignore[arg-type]
        try:
            self._launch(template)
            self.qmp("cont")
            self.run(":", timeout=self.boot_timeout, check=True)
        except BaseException:
            self._failed = True
            self.close()  # type: ignore[attr-defined]
            raise

    def _adopt(self, standby: _GuestRestore) -> bool:
        """Take over ``standby``'s QEMU, work folder and agent; False if the folder cannot
        move to this guest's (then ``standby`` is closed)."""
        from vfio_user_server.testing.guest import _live

        assert self.workdir is not None and standby.workdir is not None
        try:
            if self._own_workdir:
                os.rmdir(self.workdir)
                self.workdir = standby.workdir
            else:
                os.rename(standby.workdir, self.workdir)  # onto our empty folder
        except OSError as exc:
            log.info("not using the standby guest: %s", exc)
            standby.close()  # type: ignore[attr-defined]
            return False
        for name in ("proc", "_qmp", "_listener", "_agent_sock", "_reader", "_cond",
                     "_results", "_next_id", "_ready_count", "_agent_eof", "_send_lock",
                     "_started_at", "template", "ports", "restored", "_device_counter"):
            setattr(self, name, getattr(standby, name))
        standby._agent_owner = self
        standby._closed = True  # its close() must not end what is now ours
        _live.discard(standby)  # type: ignore[arg-type]
        self.template_made = False
        return True

    def _restore(self) -> None:
        """Start from the template snapshot (made first if missing), or adopt a standby
        guest restored from it; hot-plug the devices."""
        from vfio_user_server.testing.guest import QemuMachine  # the class this is a layer of

        assert self.prov is not None
        self.restored = True
        template, made = self._template()
        skey = self._standby_key(template)
        # No standby with extra QEMU arguments: they may name host state that two QEMUs
        # must not share (a memory-backend-file: the standby's restore would overwrite the
        # running guest's RAM).
        pooled = POOL.enabled and not self.extra_args
        standby = POOL.take(skey, self.boot_timeout) if pooled else None
        adopted = standby is not None and self._adopt(standby)
        if adopted:
            t0 = time.monotonic()
            loaded = 0.0
        else:
            t0 = self._launch(template)
            loaded = time.monotonic() - t0
            self.qmp("cont")
        self.template_made = made
        deadline = t0 + self.boot_timeout
        for dev in list(self.devices):
            self._plug(dev)
        self._settle(deadline)
        self.boot_time = time.monotonic() - t0
        prov, settings = self.prov, self._settings()

        def make() -> QemuMachine:
            machine = QemuMachine(prov, name="pyvfio-standby", cold_boot=False, **settings)
            machine.accel = self.accel
            machine._start_standby(template)
            return machine

        if pooled:
            POOL.refill(skey, make)
        how = ("a standby guest adopted" if adopted
               else f"snapshot loaded in {loaded:.2f} s")
        msg = (
            f"guest {self.name!r} restored in {self.boot_time:.2f} s "
            f"({how}, {len(self.devices)} device(s) hot-plugged; "
            f"template {template.key}{' made now' if made else ''}; accel={self.accel}, QEMU "
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

    def _settle(self, deadline: float, ports: list[str] | None = None, *,
                restored: bool = True) -> None:
        """One agent command (``pyvfio-settle``, builtins but one ``date``): after a restore,
        set the clock and add host entropy; then rescan the bus behind each used root port
        (all of them, or ``ports``), so that when it returns the guest has enumerated the
        hot-plugged devices, assigned their BARs and probed their drivers."""
        if ports is None:
            ports = [p for p in self.ports if p in self._port_users]
        bdfs = " ".join(_port_bdf(int(p[len(PORT_PREFIX):])) for p in ports)
        now, seed = (str(int(time.time())), os.urandom(32).hex()) if restored else ("-", "-")
        left = max(1.0, min(60.0, deadline - time.monotonic()))
        result = self.run(f". /bin/pyvfio-settle {now} {seed} {bdfs}", timeout=left)
        if not result.ok:
            dmesg = self.run("dmesg | tail -40", timeout=30).output
            why = "timed out" if result.timed_out else f"status {result.status}"
            raise self._error(f"the hot-plugged devices did not come up ({why}):\n"
                              f"{result.output}\n--- guest dmesg ---\n{dmesg}")

    def attach(self, device: DeviceSpec) -> str:
        """Hot-plug a vfio-user device through QMP ``device_add``; returns its id.

        Without a ``bus`` property it goes into a free root port of the kit's (restored guests
        have :data:`DEFAULT_HOTPLUG_PORTS`; ``hotplug_ports=N`` gives a cold-booted one some),
        and this returns when the guest has enumerated it and probed its driver. With a
        ``bus`` of the test's own, it returns when QEMU has realized the device; the guest
        finds it a moment later.
        """
        dev = _as_device(device)
        if self.ports and "bus" not in dev.props:
            dev_id = self._plug(dev)
            port = next(p for p, user in self._port_users.items() if user == dev_id)
            self.devices.append(dev)
            if self.agent:
                self._settle(time.monotonic() + 60, [port], restored=False)
            return dev_id
        if "bus" in dev.props:
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
