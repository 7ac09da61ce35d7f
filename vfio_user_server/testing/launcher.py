"""``vfio-user-launch``: a Python device and a Linux guest attached to it, in one command.

The successor of multi-process QEMU's ``mpqemu-launcher``: it provisions QEMU and a guest on
first use (a progress line per download), serves the device, starts the guest (restored from a
template snapshot with the device hot-plugged; ``--cold-boot`` boots it with the device
present at power-on), and then either
runs ``--run CMD`` in the guest and exits with its status, or gives a shell prompt whose
commands run in the guest (through the guest's command agent; ``exit`` or Ctrl-D leaves)::

    vfio-user-launch gpio-pci-idio-16
    vfio-user-launch --run 'cat /sys/bus/pci/devices/*/device' edu
    vfio-user-launch --trace --run 'nvme list || ls /dev/nvme*' nvme --size 64M
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from collections.abc import Sequence

from ..errors import VfioUserError
from ..protocol.constants import DmaLayout
from .harness import Guest, instantiate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfio-user-launch",
        description="Serve a Python PCI device and boot a Linux guest under QEMU attached to it.",
    )
    p.add_argument("--run", metavar="CMD", help="run CMD in the guest and exit with its status")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for --run (300)")
    p.add_argument("--modules", default=None,
                   help="comma-separated guest kernel modules to load (default: the device's)")
    p.add_argument("--no-shared-memory", action="store_true",
                   help="guest RAM without an fd: the server must DMA by messages")
    p.add_argument("--memory", type=int, default=512, help="guest RAM in MiB (512)")
    p.add_argument("--cmdline", default="", help="extra kernel command line")
    p.add_argument("--cold-boot", action="store_true",
                   help="boot the guest with the device present at power-on instead of "
                        "restoring a template snapshot and hot-plugging it")
    p.add_argument("--trace", action="store_true", help="print every vfio-user message")
    p.add_argument("--dma-layout", choices=[x.value for x in DmaLayout],
                   default=DmaLayout.AUTO.value)
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("device", help="built-in device name or module:Class")
    p.add_argument("device_args", nargs=argparse.REMAINDER, help="options for the device")
    return p


def _shell(harness: Guest) -> int:
    print("pyvfio-user: commands run in the guest; 'exit' or Ctrl-D leaves.", file=sys.stderr)
    status = 0
    while True:
        try:
            line = input("guest# ")
        except EOFError:
            print(file=sys.stderr)
            return status
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if line.strip() in ("exit", "logout", "poweroff"):
            return status
        if not line.strip():
            continue
        result = harness.run(line, timeout=0)
        sys.stdout.write(result.output)
        sys.stdout.flush()
        status = result.status


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        device = instantiate(args.device, args.device_args)
    except (VfioUserError, SystemExit) as exc:
        print(f"vfio-user-launch: {exc}", file=sys.stderr)
        return 2
    if args.modules is not None:
        modules = [m for m in args.modules.split(",") if m]
    else:
        modules = list(getattr(device, "guest_modules", []))
    trace = (lambda line: print(line, file=sys.stderr, flush=True)) if args.trace else False
    t0 = time.monotonic()
    harness = Guest(
        [device],
        trace=trace,
        dma_layout=DmaLayout(args.dma_layout),
        modules=modules,
        shared_memory=not args.no_shared_memory,
        memory_mib=args.memory,
        cmdline=args.cmdline,
        cold_boot=True if args.cold_boot else None,
    )
    try:
        harness.start()
        print(f"pyvfio-user: guest up in {time.monotonic() - t0:.1f} s "
              f"(accel={harness.started_machine.accel}) with {args.device} "
              f"{shlex.join(args.device_args)}".rstrip(), file=sys.stderr, flush=True)
        if args.run is not None:
            result = harness.run(args.run, timeout=args.timeout)
            sys.stdout.write(result.output)
            sys.stdout.flush()
            return result.status
        return _shell(harness)
    except VfioUserError as exc:
        print(f"vfio-user-launch: {exc}", file=sys.stderr)
        return 1
    finally:
        harness.close()


if __name__ == "__main__":
    sys.exit(main())
