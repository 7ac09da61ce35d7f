"""``vfio-user-server --socket PATH DEVICE [device options] [-- --socket PATH2 DEVICE2 ...]``.

DEVICE is a built-in device name (``vfio-user-server --list``) or ``module:Class`` naming a
:class:`~vfio_user_server.device.PciDevice` subclass; the module may sit in the current folder
(or the one ``--app-dir DIR`` names), which goes first on the import path. Options after
DEVICE go to the device: the ones its class declares in ``options``
(``vfio-user-server --socket S DEVICE --help`` lists them).

One process serves several devices, each on its own socket with its own client: ``--``
separates them, each group with its own socket options. Instead of ``--socket``, a device
may serve a socket that a supervisor opened (``--fd N``; systemd socket activation through
``LISTEN_FDS``, ``--fd-name`` for named ones), and readiness goes to ``NOTIFY_SOCKET``
(:mod:`vfio_user_server.systemd`). The exit statuses are the ``EXIT_*`` constants.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from . import __version__, control, reload, systemd
from . import server as server_mod
from .endpoint import VfioDevice
from .errors import VfioUserError
from .options import build_device
from .protocol.constants import DmaLayout
from .server import Server
from .upgrade import receive_and_resume_all, refuse

#: Built-in devices: name -> "module:Class".
BUILTIN_DEVICES: dict[str, str] = {
    "gpio-pci-idio-16": "vfio_user_devices.idio16:PciIdio16",
    "edu": "vfio_user_devices.edu:Edu",
    "nvme": "vfio_user_devices.nvme:NvmeController",
    "sample": "vfio_user_server.sample:SampleDevice",
    "virtio-blk": "vfio_user_devices.virtio_blk:VirtioBlk",
    "virtio-rng": "vfio_user_devices.virtio_rng:VirtioRng",
}


def load_device_class(spec: str, app_dir: str | os.PathLike[str] | None = None) -> type[Any]:
    """Resolve a built-in name or ``module:Class`` to the device class.

    ``app_dir``, when given with a ``module:Class``, goes first on ``sys.path`` (as uvicorn's
    ``--app-dir`` does), so that a module in that folder imports: the CLI passes the current
    folder by default. Built-in names never look there.
    """
    target = BUILTIN_DEVICES.get(spec, spec)
    if ":" not in target:
        raise VfioUserError(
            f"unknown device {spec!r}: use one of {', '.join(sorted(BUILTIN_DEVICES))} or "
            "module:Class"
        )
    module_name, _, attr = target.partition(":")
    where = ""
    if app_dir is not None and spec not in BUILTIN_DEVICES:
        folder = os.path.abspath(app_dir)
        if not os.path.isdir(folder):
            raise VfioUserError(f"--app-dir {os.fspath(app_dir)!r} is not a folder")
        if folder not in sys.path:
            sys.path.insert(0, folder)
            importlib.invalidate_caches()
        where = f" (looked in {folder} and the installed packages; --app-dir names another folder)"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise VfioUserError(f"cannot import {module_name!r}: {exc}{where}") from exc
    try:
        cls = getattr(module, attr)
    except AttributeError:
        raise VfioUserError(f"{module_name!r} has no attribute {attr!r}") from None
    if not isinstance(cls, type) or not issubclass(cls, VfioDevice):
        raise VfioUserError(f"{target} is not a device class")
    return cls


def make_device(spec: str, argv: Sequence[str] = (),
                app_dir: str | os.PathLike[str] | None = None) -> VfioDevice:
    """Instantiate a device from its name and its own command-line options.

    The options are the class's ``options`` (see :mod:`vfio_user_server.options`); their
    values go to the constructor as keywords. ``app_dir``: see :func:`load_device_class`.
    """
    cls = load_device_class(spec, app_dir)
    for old in ("add_arguments", "from_arguments"):
        if hasattr(cls, old):
            raise VfioUserError(f"{cls.__name__}.{old}: declare the device's options in its "
                                "'options' class attribute instead (vfio_user_server.options)")
    device = build_device(cls, getattr(cls, "options", ()), argv,
                          prog=f"vfio-user-server ... {spec}")
    assert isinstance(device, VfioDevice)
    return device


#: Exit statuses (docs: README.md, "Run a device"): a supervisor tells them apart.
EXIT_OK = 0  #: stopped by SIGTERM or SIGINT, or every --once device's client left
EXIT_DEVICE = 1  #: the device could not be loaded or built (import error, unknown name, ...)
EXIT_USAGE = 2  #: bad arguments
EXIT_SOCKET = 3  #: a socket could not be served (in use, missing folder, bad --fd, ...)

#: Separates the devices of one process on the command line.
GROUP_SEPARATOR = "--"


class UsageError(Exception):
    """Bad arguments: exit status 2."""


def build_parser(process: bool = True) -> argparse.ArgumentParser:
    """The parser of one device group; ``process`` adds the options of the whole process
    (accepted in the first group only)."""
    p = argparse.ArgumentParser(
        prog="vfio-user-server",
        description="Serve Python PCI devices to vfio-user clients such as QEMU's "
        "vfio-user-pci: one device per socket, several devices separated by '--'.",
        epilog="exit status: 0 stopped by SIGTERM/SIGINT (or --once done), 1 device could "
        "not be loaded, 2 bad arguments, 3 socket could not be served",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", "-s", help="UNIX socket path to listen on")
    where.add_argument("--fd", type=int, metavar="N",
                       help="serve the listening AF_UNIX stream socket open on fd N (handed "
                       "over by a supervisor)")
    where.add_argument("--fd-name", metavar="NAME",
                       help="serve the socket-activated fd named NAME (systemd's "
                       "FileDescriptorName=, in LISTEN_FDNAMES)")
    p.add_argument("--mode", default="0600", help="socket file mode (octal, default 0600)")
    p.add_argument("--trace", action="store_true", help="print every message, one line each")
    p.add_argument(
        "--dma-layout",
        choices=[x.value for x in DmaLayout],
        default=DmaLayout.AUTO.value,
        help="DMA_READ/WRITE layout: spec (QEMU 11.1), legacy (QEMU 10.1/10.2), auto (probe)",
    )
    p.add_argument("--app-dir", default=".", metavar="DIR",
                   help="folder searched first for a module:Class device (default: the "
                   "current folder)")
    p.add_argument("--once", action="store_true",
                   help="stop serving this device after its first client leaves")
    if process:
        p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
        p.add_argument("--list", action="store_true", help="list built-in devices and exit")
        p.add_argument("--reload", action="store_true",
                       help="watch each device's source file; when it is saved, upgrade the "
                       "process to the new code, carrying the device state (or resetting the "
                       "device when the state no longer fits); needs --socket for each device")
        p.add_argument("--version", action="version", version=f"pyvfio-user {__version__}")
    p.add_argument("device", nargs="?", help="built-in device name or module:Class")
    p.add_argument("device_args", nargs=argparse.REMAINDER, help="options for the device")
    return p


def split_groups(argv: Sequence[str]) -> list[list[str]]:
    """``A... -- B... -- C...`` -> ``[[A...], [B...], [C...]]``: one list per device."""
    groups: list[list[str]] = [[]]
    for arg in argv:
        if arg == GROUP_SEPARATOR:
            groups.append([])
        else:
            groups[-1].append(arg)
    return groups


Source = str | int  # a socket path, or a listening fd


def assign_sources(groups: Sequence[argparse.Namespace],
                   activated: systemd.ActivatedFds) -> list[Source]:
    """Where each device listens: its ``--socket`` or ``--fd``, the activated fd its
    ``--fd-name`` names, or else the next socket-activated fd not claimed by another group."""
    sources: list[Source | None] = []
    claimed: set[int] = set()
    for g in groups:
        if g.socket is not None:
            sources.append(g.socket)
        elif g.fd is not None:
            if g.fd in claimed:
                raise UsageError(f"--fd {g.fd} is given to two devices")
            claimed.add(g.fd)
            sources.append(g.fd)
        elif g.fd_name is not None:
            named = [fd for fd in activated.by_name(g.fd_name) if fd not in claimed]
            if not named:
                have = ", ".join(sorted(set(activated.names))) or "none"
                raise UsageError(f"--fd-name {g.fd_name}: no socket-activated fd has that "
                                 f"name (LISTEN_FDNAMES: {have})")
            claimed.add(named[0])
            sources.append(named[0])
        else:
            sources.append(None)
    free = [fd for fd in activated.fds if fd not in claimed]
    wanting = sources.count(None)
    if wanting and not activated.fds:
        raise UsageError("--socket PATH, --fd N or socket activation (LISTEN_FDS) is needed "
                         "for each device")
    if wanting and wanting != len(free):
        raise UsageError(f"{wanting} device(s) without --socket/--fd/--fd-name, but "
                         f"{len(free)} unclaimed socket-activated fd(s) (LISTEN_FDS)")
    it = iter(free)
    return [next(it) if s is None else s for s in sources]


def _describe(source: Source) -> str:
    return f"fd {source}" if isinstance(source, int) else source


def upgrade_main(argv: Sequence[str]) -> int:
    """``vfio-user-server upgrade --socket PATH``: 0 once the new process serves."""
    p = argparse.ArgumentParser(prog="vfio-user-server upgrade",
                                description="Replace the server of a socket by a new process "
                                "running the code now on disk; the client stays connected.")
    p.add_argument("--socket", "-s", required=True, help="the device's socket path")
    args = p.parse_args(argv)
    try:
        pid = control.request_upgrade(args.socket)
    except (VfioUserError, OSError) as exc:
        print(f"vfio-user-server: {exc}", file=sys.stderr)
        return EXIT_DEVICE
    print(f"vfio-user-server: {args.socket} upgraded, now served by pid {pid}", flush=True)
    return EXIT_OK


def _refuse(fd: int, why: str) -> None:
    """Tell the old process of an upgrade that this one cannot serve (it serves on)."""
    with socket.socket(fileno=fd) as chan:
        refuse(chan, why)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["upgrade"]:
        return upgrade_main(argv[1:])
    handover_fd = os.environ.pop(control.HANDOVER_ENV, None)
    groups = split_groups(argv)
    args = build_parser().parse_args(groups[0])
    if args.list:
        for name, target in sorted(BUILTIN_DEVICES.items()):
            print(f"{name:20} {target}")
        return EXIT_OK
    specs = [args, *(build_parser(process=False).parse_args(g) for g in groups[1:])]
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    log = logging.getLogger(__name__)
    try:
        for n, spec in enumerate(specs, 1):
            if not spec.device:
                raise UsageError(f"device {n}: DEVICE is required (vfio-user-server --list)")
            try:
                spec.mode_bits = int(spec.mode, 8)
            except ValueError:
                raise UsageError(f"--mode {spec.mode!r} is not an octal mode") from None
        if (handover_fd is not None or args.reload) and any(s.socket is None for s in specs):
            what = "--reload" if args.reload else control.HANDOVER_ENV
            raise UsageError(f"{what}: every device needs --socket PATH (its control socket "
                             "is PATH.ctl)")
        try:
            activated = (systemd.ActivatedFds() if handover_fd is not None
                         else systemd.listen_fds())
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        sources = assign_sources(specs, activated)
    except UsageError as exc:
        print(f"vfio-user-server: {exc}", file=sys.stderr)
        return EXIT_USAGE

    if args.reload:  # a stale .pyc must never stand in for a source saved within a second
        sys.dont_write_bytecode = True
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    devices: list[VfioDevice] = []
    try:
        for spec in specs:
            devices.append(make_device(spec.device, spec.device_args, spec.app_dir))
    except (VfioUserError, OSError) as exc:
        if handover_fd is not None:
            _refuse(int(handover_fd), reload.describe_load_error(exc))
        print(f"vfio-user-server: {exc}", file=sys.stderr)
        return EXIT_DEVICE
    except Exception as exc:  # the new code of an upgrade or a reload: the old one serves on
        if handover_fd is None:
            raise
        why = reload.describe_load_error(exc)
        _refuse(int(handover_fd), why)
        print(f"vfio-user-server: the new code failed: {why}", file=sys.stderr)
        return EXIT_DEVICE

    servers: list[Server] = []
    lock = threading.Lock()
    stopping = threading.Event()
    running: list[Server] = []  # servers whose loop started; the stopper stops these

    def stop_all() -> None:
        systemd.notify("STOPPING=1\nSTATUS=stopping")
        with lock:
            stopping.set()
            started = list(running)
        for srv in started:
            srv.stop()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        log.info("signal %d: shutting down", signum)
        threading.Thread(target=stop_all, name="vfio-user-stop", daemon=True).start()

    # before the sockets appear: whoever sees one may signal us at once
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # a live upgrade needs each device on a --socket path: its control socket is PATH.ctl
    paths = [Path(s) for s in sources if isinstance(s, str)]
    upgradable = len(paths) == len(sources)
    ctl: control.ControlSocket | None = None
    reloader: reload.Reloader | None = None
    try:
        if handover_fd is not None:  # a new process of a live upgrade: take over, serve, ack
            with socket.socket(fileno=int(handover_fd)) as chan:
                servers += receive_and_resume_all(
                    chan, [(device, {"mode": spec.mode_bits, "trace": spec.trace,
                                     "release_memory": True, "upgradable": True})
                           for spec, device in zip(specs, devices, strict=True)],
                    reset_own=args.reload)
        else:
            for spec, device, source in zip(specs, devices, sources, strict=True):
                where: str | socket.socket = (server_mod.listening_socket(source)
                                              if isinstance(source, int) else source)
                srv = Server(device, where, mode=spec.mode_bits, trace=spec.trace,
                             dma_layout=DmaLayout(spec.dma_layout), release_memory=True,
                             upgradable=upgradable)
                servers.append(srv)
                srv.listen()
        if upgradable:
            ctl = control.ControlSocket(servers, [control.control_path(p) for p in paths], argv)
        if ctl is not None and args.reload:
            reloader = reload.Reloader(
                ctl, reload.source_files(type(d) for d in devices), reload.baseline_from_env())
    except (VfioUserError, OSError) as exc:
        for srv in servers:
            srv.close()
        print(f"vfio-user-server: {exc}", file=sys.stderr)
        return EXIT_SOCKET

    status = EXIT_OK
    threads: list[threading.Thread] = []

    def run(srv: Server, once: bool) -> None:
        nonlocal status
        if once:
            def stop_after_first_client() -> None:
                srv.wait_for_disconnect(1)
                srv.stop()

            threading.Thread(target=stop_after_first_client, daemon=True).start()
        try:
            if srv.started:  # handed over: resumed and already serving
                srv.join()
            else:
                srv.serve_forever()
        except Exception:
            log.exception("serving %s failed", srv.path)
            status = EXIT_SOCKET

    with lock:
        if not stopping.is_set():
            for spec, srv in zip(specs, servers, strict=True):
                t = threading.Thread(target=run, args=(srv, spec.once), daemon=True,
                                     name=f"vfio-user-server:{srv.path.name}")
                running.append(srv)
                threads.append(t)
                t.start()
    for spec, source in zip(specs, sources, strict=True):
        print(f"vfio-user-server: serving {spec.device} on {_describe(source)}",
              file=sys.stderr, flush=True)
    names = ", ".join(f"{spec.device} on {_describe(source)}"
                      for spec, source in zip(specs, sources, strict=True))
    systemd.notify(f"READY=1\nSTATUS=serving {names}\nMAINPID={os.getpid()}")
    try:
        for t in threads:
            t.join()
        if ctl is not None and any(srv.handed_over for srv in servers):
            ctl.upgraded.wait(control.UPGRADE_TIMEOUT)  # the requester has its answer
    finally:
        if reloader is not None:
            reloader.stop()
        if ctl is not None:
            ctl.close()
        for srv in servers:
            srv.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
