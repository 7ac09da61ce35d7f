"""Device command-line options, declared on the device class.

A device lists its options in :attr:`PciDevice.options <vfio_user_server.device.PciDevice.options>`;
``vfio-user-server ... DEVICE [options]`` (and the guest-test kit, and the launcher) turn them
into argparse options and pass the values to the device's constructor as keywords::

    class Edu(PciDevice):
        options = (
            Option("--dma-mask", "mask applied to DMA addresses", type=integer,
                   default=0x0FFFFFFF),
            Option("--dma-delay-ms", "delay before a DMA transfer runs", type=milliseconds,
                   default=0.0, param="dma_delay"),
        )

        def __init__(self, *, dma_mask: int = 0x0FFFFFFF, dma_delay: float = 0.0) -> None: ...

``vfio-user-server --socket S edu --dma-mask 0xffffffff`` then builds
``Edu(dma_mask=0xffffffff, dma_delay=0.0)``. Options that are not given pass their default.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Option", "build_device", "integer", "milliseconds", "option_parser"]

T = TypeVar("T")


def integer(text: str) -> int:
    """An integer in any base Python reads (``16``, ``0x10``, ``0o20``, ``0b10000``)."""
    return int(text, 0)


def milliseconds(text: str) -> float:
    """A duration given in milliseconds, as seconds."""
    return float(text) / 1000


@dataclass(frozen=True)
class Option:
    """One device option: ``flag`` on the command line, ``param`` in the constructor.

    ``type`` converts the text (a ``ValueError`` from it is a usage error naming the option);
    ``switch`` makes a flag without a value that passes True when given (``default`` is then
    False). ``param`` defaults to the flag without its dashes, ``-`` read as ``_``.
    """

    flag: str
    help: str
    type: Callable[[str], Any] = str
    default: Any = None
    param: str | None = None
    switch: bool = False
    metavar: str | None = None

    def __post_init__(self) -> None:
        if not self.flag.startswith("--") or len(self.flag) < 3:
            raise ValueError(f"device option {self.flag!r}: a long option (--name) is needed")

    @property
    def keyword(self) -> str:
        """The constructor keyword this option fills."""
        return self.param or self.flag[2:].replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        if self.switch:
            parser.add_argument(self.flag, dest=self.keyword, action="store_true",
                                help=self.help)
            return
        metavar = self.metavar or self.flag[2:].upper().replace("-", "_")
        parser.add_argument(self.flag, dest=self.keyword, type=self.type, default=self.default,
                            metavar=metavar, help=self.help)


def option_parser(options: Sequence[Option], prog: str) -> argparse.ArgumentParser:
    """The argparse parser of a device's options (``--help`` lists them)."""
    parser = argparse.ArgumentParser(prog=prog)
    seen: set[str] = set()
    for opt in options:
        if opt.keyword in seen:
            raise ValueError(f"{prog}: two options fill {opt.keyword!r}")
        seen.add(opt.keyword)
        opt.add_to(parser)
    return parser


def build_device(cls: Callable[..., T], options: Sequence[Option], argv: Sequence[str],
                 prog: str) -> T:
    """Parse ``argv`` with ``options`` and call ``cls`` with the values as keywords.

    A usage error prints argparse's message and raises ``SystemExit(2)``, as argparse does.
    """
    ns = option_parser(options, prog).parse_args(list(argv))
    return cls(**{opt.keyword: getattr(ns, opt.keyword) for opt in options})
