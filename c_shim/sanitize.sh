#!/usr/bin/env bash
# Run pytest against the C shim built with AddressSanitizer and UndefinedBehaviorSanitizer.
#
#   c_shim/sanitize.sh tests/test_msg_shim.py -q          # any pytest arguments
#   PYVFIO_SANITIZE=undefined c_shim/sanitize.sh ...       # other -fsanitize= lists
#
# The three cffi modules are built with PYVFIO_SANITIZE (c_shim/cflags.py) into a folder of
# their own, which PYVFIO_SHIM_DIR puts first on the package's path (vfio_user_server/__init__.py):
# the tests and the servers they start load them instead of the normal build, and nothing is
# left in the source tree. The interpreter itself is not instrumented: libasan is preloaded, and
# leak detection is off (CPython keeps its arenas to the end); handle_sigbus=0 leaves SIGBUS to
# the DMA guard and its tests. Every sanitizer report aborts the process
# (-fno-sanitize-recover=all; halt_on_error), so a report is a failed run. Run it from the
# project's virtualenv (python on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYVFIO_SANITIZE="${PYVFIO_SANITIZE:-address,undefined}"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for b in dma msg poll; do
    python - "$b" "$out/tmp" <<'PY' >/dev/null
import runpy, shutil, sys
from pathlib import Path
ns = runpy.run_path(f"c_shim/build_{sys.argv[1]}.py")
so = Path(ns["ffibuilder"].compile(tmpdir=sys.argv[2]))
shutil.move(so, Path(sys.argv[2]).parent / so.name)
PY
done
rm -rf "$out/tmp"
export PYVFIO_SHIM_DIR="$out"
runtime=$(gcc -print-file-name=libasan.so)
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:halt_on_error=1:abort_on_error=1:allow_user_segv_handler=1:handle_sigbus=0}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"
case "$PYVFIO_SANITIZE" in
    *address*) export LD_PRELOAD="$runtime${LD_PRELOAD:+:$LD_PRELOAD}" ;;
esac
# the sanitized modules, not the normal build nor the pure-Python path (tests skip without a shim)
python - <<'PY'
import os
import vfio_user_server._dma_shim, vfio_user_server._msg_shim, vfio_user_server._poll_shim
for m in (vfio_user_server._dma_shim, vfio_user_server._msg_shim, vfio_user_server._poll_shim):
    assert m.__file__.startswith(os.environ["PYVFIO_SHIM_DIR"]), m.__file__
PY
python -m pytest -p no:cacheprovider "$@"
