"""``vfio-user-server --socket PATH DEVICE [device options]``.

DEVICE is a built-in device name (``vfio-user-server --list``) or ``module:Class`` naming a
:class:`~vfio_user_server.device.PciDevice` subclass; the module may sit in the current folder
(or the one ``--app-dir DIR`` names), which goes first on the import path. Options after
DEVICE go to the device: the ones its class declares in ``options``
(``vfio-user-server --socket S DEVICE --help`` lists them).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from . import __version__
from .endpoint import VfioDevice
from .errors import VfioUserError
from .options import build_device
from .protocol.constants import DmaLayout
from .server import Server

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfio-user-server",
        description="Serve a Python PCI device to a vfio-user client such as QEMU's "
        "vfio-user-pci.",
    )
    p.add_argument("--socket", "-s", help="UNIX socket path to listen on")
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
    p.add_argument("--once", action="store_true", help="exit after the first client leaves")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    p.add_argument("--list", action="store_true", help="list built-in devices and exit")
    p.add_argument("--version", action="version", version=f"pyvfio-user {__version__}")
    p.add_argument("device", nargs="?", help="built-in device name or module:Class")
    p.add_argument("device_args", nargs=argparse.REMAINDER, help="options for the device")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for name, target in sorted(BUILTIN_DEVICES.items()):
            print(f"{name:20} {target}")
        return 0
    if not args.device or not args.socket:
        print("vfio-user-server: --socket PATH and DEVICE are required", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        device = make_device(args.device, args.device_args, args.app_dir)
        server = Server(device, args.socket, mode=int(args.mode, 8), trace=args.trace,
                        dma_layout=DmaLayout(args.dma_layout), release_memory=True)
    except (VfioUserError, OSError) as exc:
        print(f"vfio-user-server: {exc}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        del frame
        logging.getLogger(__name__).info("signal %d: shutting down", signum)
        threading.Thread(target=server.stop, daemon=True).start()

    # before the socket appears: whoever sees it may signal us at once
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.listen()
    except (VfioUserError, OSError) as exc:
        server.close()
        print(f"vfio-user-server: {exc}", file=sys.stderr)
        return 1
    if args.once:

        def stop_after_first_client() -> None:
            server.wait_for_disconnect(1)
            server.stop()

        threading.Thread(target=stop_after_first_client, daemon=True).start()
    print(f"vfio-user-server: serving {args.device} on {args.socket}", file=sys.stderr,
          flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
