"""Run a Python module with cProfile on every thread, and write the merged stats at exit.

    python bench/thread_profile.py OUT.prof -m vfio_user_server.cli --socket S virtio-blk ...
    python -c "import pstats; pstats.Stats('OUT.prof').sort_stats('tottime').print_stats(30)"

cProfile sees only the thread it runs on; a vfio-user server does its work on the loop thread
and the worker, so each thread gets its own profiler (patched into ``threading.Thread.run``)
and the profiles are merged when the process exits normally (the CLI does on SIGTERM).
"""

from __future__ import annotations

import atexit
import cProfile
import pstats
import runpy
import sys
import threading
from typing import Any

_profiles: list[cProfile.Profile] = []
_run = threading.Thread.run


def _profiled_run(self: threading.Thread) -> None:
    prof = cProfile.Profile()
    _profiles.append(prof)
    prof.enable()
    try:
        _run(self)
    finally:
        prof.disable()


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        raise SystemExit(__doc__)
    out, module = sys.argv[1], sys.argv[3]
    threading.Thread.run = _profiled_run  # type: ignore[method-assign]
    main_prof = cProfile.Profile()
    _profiles.append(main_prof)

    def dump() -> None:
        main_prof.disable()
        stats: Any = pstats.Stats(_profiles[0])
        for prof in _profiles[1:]:
            stats.add(prof)
        stats.dump_stats(out)

    atexit.register(dump)
    sys.argv = [module, *sys.argv[4:]]
    main_prof.enable()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
