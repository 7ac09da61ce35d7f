"""Compiler flags of the three cffi builds (``build_dma.py``, ``build_msg.py``, ``build_poll.py``).

``PYVFIO_SANITIZE`` (e.g. ``address,undefined``) builds the shim with those ``-fsanitize=``
checks, unoptimised enough for readable reports, and with every report fatal. A sanitized
module only loads into a Python that has the sanitizer's runtime: ``c_shim/sanitize.sh`` builds
them in place and runs pytest under ``LD_PRELOAD`` of libasan (docs/reliability.md).
"""

from __future__ import annotations

import os

ENV_SANITIZE = "PYVFIO_SANITIZE"
_WARNINGS = ["-Wall", "-Wextra"]


def sanitizers() -> str:
    """The ``-fsanitize=`` list asked for, or ""."""
    return os.environ.get(ENV_SANITIZE, "").strip()


def compile_args() -> list[str]:
    s = sanitizers()
    if not s:
        return ["-O2", *_WARNINGS]
    return ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={s}",
            "-fno-sanitize-recover=all", *_WARNINGS]


def link_args() -> list[str]:
    s = sanitizers()
    return [f"-fsanitize={s}"] if s else []
